"""`samhq export masks`: a real `samhq everything` / `samhq segment --json` output folder converted to
every format, each read back (pycocotools, our YOLO and LabelMe readers, GDAL's OGR) to the masks
the commands wrote; bad input and existing outputs are one-line errors, exit code 2."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_automatic import tiny_256_model

from samhq.cli import main

pytest.importorskip("rasterio")
pytest.importorskip("shapely")
pytest.importorskip("pycocotools")

from samhq.formats import read_labelme, read_samhq_outputs, read_yolo, split_output_formats  # noqa: E402
from samhq.masks import coco_to_mask  # noqa: E402

EVERYTHING = ["--points-per-side", "4", "--pred-iou-thresh", "0.1", "--stability-thresh", "0.3"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A folder written by the real commands: two images by `everything`, one by `segment --json`."""
    root = tmp_path_factory.mktemp("export")
    tiny_256_model().save_pretrained(root / "model")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    g = np.random.default_rng(0)
    Image.fromarray(np.kron(g.integers(0, 255, (6, 8, 3)), np.ones((12, 12, 1))).astype(np.uint8)).save(photos / "a.png")
    Image.fromarray(np.kron(g.integers(0, 255, (5, 4, 3)), np.ones((14, 14, 1))).astype(np.uint8)).save(photos / "sub" / "b.jpg")
    out = root / "out"
    assert main(["everything", str(photos), "--out", str(out), "--model", str(root / "model"), "--format", "json",
                 *EVERYTHING]) == 0
    assert main(["segment", str(photos / "a.png"), "--model", str(root / "model"), "--point", "30,20",
                 "--box", "5,5,60,50", "--json", str(out / "seg_a.json"), "--out", str(root / "seg_a.png")]) == 0
    return root, photos, out


def masks_of(doc):
    anns = doc.get("annotations") or doc.get("masks")
    return [coco_to_mask(a["segmentation"]) for a in anns]


def test_every_format_reads_back(outputs, tmp_path, capsys):
    from pycocotools.coco import COCO

    root, photos, src = outputs
    docs = {name: json.loads((src / f"{name}.json").read_text()) for name in ("a", "sub/b", "seg_a")}
    expect = {name: masks_of(doc) for name, doc in docs.items()}
    assert all(len(m) > 0 for m in expect.values())
    ds = tmp_path / "ds"
    code, out, err = cli(capsys, "export", "masks", src, "--format", "coco,yolo,labelme,labelstudio,geojson,png",
                         "--out", ds, "--category", "cell")
    assert code == 0, err
    assert f"3 images, {sum(map(len, expect.values()))} masks" in out

    coco = COCO(str(ds / "coco" / "instances.json"))
    assert [c["name"] for c in coco.dataset["categories"]] == ["cell"]
    for image_id, name in enumerate(["a", "seg_a", "sub/b"], start=1):  # one COCO image per document, by name
        doc = docs[name]
        file_name = doc["images"][0]["file_name"] if "images" in doc else doc["image"]
        assert coco.loadImgs(image_id)[0]["file_name"] == file_name
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            got = [coco.annToMask(a).astype(bool) for a in anns]
        assert len(got) == len(expect[name]) and all(np.array_equal(a, b) for a, b in zip(got, expect[name]))
        assert [a["area"] for a in anns] == [int(m.sum()) for m in expect[name]]

        h, w = expect[name][0].shape
        yolo = read_yolo((ds / "yolo" / "labels" / f"{name}.txt").read_text(), h, w, num_classes=1)
        assert [c for c, _ in yolo] == [0] * len(expect[name])
        assert all(np.array_equal(a, b) for (_, a), b in zip(yolo, expect[name]))

        lm_path = ds / "labelme" / f"{name}.json"
        lm = json.loads(lm_path.read_text())
        assert (lm_path.parent / lm["imagePath"]).resolve() == Path(file_name).resolve()  # relative to labelme/
        got = [m for _, m in read_labelme(lm)]
        assert len(got) == len(expect[name]) and all(np.array_equal(a, b) for a, b in zip(got, expect[name]))

        geo = json.loads((ds / "geojson" / f"{name}.geojson").read_text())
        assert [f["properties"]["category"] for f in geo["features"]] == ["cell"] * len(expect[name])

        pngs = sorted((ds / f"{name}_masks").glob("*.png"))
        assert all(np.array_equal(np.asarray(Image.open(p)) > 0, m) for p, m in zip(pngs, expect[name]))
    tasks = json.loads((ds / "label_studio" / "tasks.json").read_text())
    assert [len(t["predictions"][0]["result"]) for t in tasks] == [len(expect[n]) for n in ("a", "seg_a", "sub/b")]
    assert (ds / "yolo" / "images" / "sub" / "b.jpg").resolve() == (photos / "sub" / "b.jpg").resolve()

    # nothing is overwritten without --force: one line, exit 2, files untouched
    before = (ds / "coco" / "instances.json").read_bytes()
    code, out, err = cli(capsys, "export", "masks", src, "--format", "coco", "--out", ds, "--category", "x")
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert (ds / "coco" / "instances.json").read_bytes() == before
    code, _, err = cli(capsys, "export", "masks", src, "--format", "coco", "--out", ds, "--categories", "1=nucleus", "--force")
    assert code == 0, err
    assert json.loads((ds / "coco" / "instances.json").read_text())["categories"][0]["name"] == "nucleus"


def test_outputs_in_the_source_folder_are_not_read_again(outputs, tmp_path, capsys):
    import shutil

    _, _, src = outputs
    work = tmp_path / "work"
    shutil.copytree(src, work)
    assert cli(capsys, "export", "masks", work, "--format", "coco,labelme,labelstudio,geojson", "--out", work)[0] == 0
    images, cats = read_samhq_outputs(work)
    assert [im["name"] for im in images] == ["a", "seg_a", "sub/b"] and cats == {1: "object"}


def test_mask_png_folders_with_images(outputs, tmp_path, capsys):
    root, photos, src = outputs
    work = tmp_path / "pngs"
    masks = masks_of(json.loads((src / "a.json").read_text()))
    (work / "a_masks").mkdir(parents=True)
    for i, m in enumerate(masks):
        Image.fromarray(m.astype(np.uint8) * 255).save(work / "a_masks" / f"{i:03d}.png")
    code, _, err = cli(capsys, "export", "masks", work, "--format", "yolo,coco", "--out", tmp_path / "ds", "--images", photos)
    assert code == 0, err
    coco = json.loads((tmp_path / "ds" / "coco" / "instances.json").read_text())
    assert coco["images"][0]["file_name"] == str(photos / "a.png") and len(coco["annotations"]) == len(masks)
    assert (tmp_path / "ds" / "yolo" / "images" / "a.png").exists()


@pytest.mark.parametrize("args, message", [
    (["missing_dir", "--format", "coco"], "not a folder"),
    (["{src}", "--format", "coco,tiff"], "unknown format 'tiff'"),
    (["{src}", "--format", "coco", "--categories", "1:cat"], "ID=NAME"),
    (["{src}", "--format", "coco", "--category", "a", "--categories", "1=b"], "not both"),
    (["{src}", "--format", "coco", "--categories", "1=dog"], "category_id"),
    (["{empty}", "--format", "coco"], "no samhq outputs"),
    (["{src}", "--format", "yolo", "--tolerance", "-1"], ">= 0"),
])
def test_bad_input_is_one_line(outputs, tmp_path, capsys, args, message):
    _, _, src = outputs
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.json").write_text('{"not": "samhq"}')
    argv = [a.format(src=src, empty=tmp_path / "empty") for a in args]
    if message == "category_id":  # a mapping that lacks the files' category id 1
        argv[-1] = "2=dog"
    code, out, err = cli(capsys, "export", "masks", *argv, "--out", tmp_path / "ds")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ds").exists()


def test_split_output_formats():
    assert split_output_formats("both,coco,YOLO") == (["json", "png"], ["coco", "yolo"])
    assert split_output_formats("json") == (["json"], [])
    assert split_output_formats("labelme,label-studio") == ([], ["labelme", "labelstudio"])
    with pytest.raises(ValueError, match="unknown format"):
        split_output_formats("json,tiff")

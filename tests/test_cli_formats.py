"""`--format LIST` in `samhq everything` and `samhq segment`: every format's file, read back by its own reader
(pycocotools for COCO; samhq's documented YOLO, LabelMe and Label Studio RLE readers; shapely for GeoJSON),
holds the masks of the command's own NAME.json; all of an image's files are written or none (the output
journal); whole-run files (COCO, Label Studio, YOLO's data.yaml) cover every image of the folder."""
import errno
import json

import numpy as np
import pytest
from PIL import Image
from test_automatic import tiny_256_model
from test_tiles import scene

from samhq.cli import _outputs as O
from samhq.cli import main
from samhq.masks import coco_to_mask

pytest.importorskip("pycocotools")
pytest.importorskip("rasterio")
pytest.importorskip("shapely")

NO_GRAD = True
AMG_ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "0.1", "--stability-thresh", "0.3", "--box-nms-thresh", "1.0",
            "--threads", "1"]
ALL = "both,coco,yolo,labelme,labelstudio,geojson"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    tiny_256_model().save_pretrained(root / "model")
    (root / "in" / "sub").mkdir(parents=True)
    for name, seed in (("a", 1), ("sub/b", 2)):
        image, _ = scene(72, 96, [("ellipse", (8, 8, 40, 44), (220, 60, 40)), ("rectangle", (50, 20, 90, 60), (40, 200, 60))],
                         seed=seed)
        Image.fromarray(image).save(root / "in" / f"{name}.png")
    return root


def everything(root, out, *extra):
    return main(["everything", str(root / "in"), "--out", str(out), "--model", str(root / "model"), *AMG_ARGS, *extra])


def own_masks(out, name):
    doc = json.loads((out / f"{name}.json").read_text())
    return doc, [coco_to_mask(a["segmentation"]) for a in doc["annotations"]]


def geojson_masks(doc, h, w):
    from shapely.geometry import shape

    from samhq.formats import polygons_to_mask

    out = []
    for f in doc["features"]:
        g = shape(f["geometry"])
        polys = list(g.geoms) if g.geom_type == "MultiPolygon" else [g]
        out.append(polygons_to_mask([[np.asarray(p.exterior.coords)[:-1]] + [np.asarray(r.coords)[:-1] for r in p.interiors]
                                     for p in polys], h, w))
    return out


def test_everything_writes_every_format_of_its_masks(setup, tmp_path, capsys):
    from pycocotools.coco import COCO

    from samhq.formats import ls_rle_to_mask, read_labelme, read_yolo

    out = tmp_path / "out"
    assert everything(setup, out, "--format", ALL, "--category", "cell") == 0
    assert "2 images done" in capsys.readouterr().out
    coco = COCO(str(out / "coco" / "instances.json"))
    assert coco.dataset["categories"] == [{"id": 1, "name": "cell", "supercategory": "cell"}]
    inputs = [str(setup / "in" / "a.png"), str(setup / "in" / "sub" / "b.png")]
    assert [im["file_name"] for im in coco.dataset["images"]] == inputs
    tasks = json.loads((out / "label_studio" / "tasks.json").read_text())
    assert len(tasks) == 2 and 'value="cell"' in (out / "label_studio" / "config.xml").read_text()
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load((out / "yolo" / "data.yaml").read_text())["names"] == {0: "cell"}
    n_masks = 0
    for k, name in enumerate(("a", "sub/b")):
        doc, masks = own_masks(out, name)
        assert doc["categories"] == [{"id": 1, "name": "cell"}]
        h, w = doc["images"][0]["height"], doc["images"][0]["width"]
        assert len(masks) > 0
        n_masks += len(masks)
        anns = coco.imgToAnns[k + 1]
        assert len(anns) == len(masks) and all(np.array_equal(coco.annToMask(a).astype(bool), m) for a, m in zip(anns, masks))
        assert all(a["score"] == pytest.approx(o["predicted_iou"]) for a, o in zip(anns, doc["annotations"]))
        got = read_yolo((out / "yolo" / "labels" / f"{name}.txt").read_text(), h, w, num_classes=1)
        assert len(got) == len(masks) and all(np.array_equal(g, m) for (_, g), m in zip(got, masks))
        assert (out / "yolo" / "images" / f"{name}.png").resolve() == (setup / "in" / f"{name}.png").resolve()
        labelme = json.loads((out / "labelme" / f"{name}.json").read_text())
        image_path = (out / "labelme" / f"{name}.json").parent / labelme["imagePath"]
        assert image_path.resolve() == (setup / "in" / f"{name}.png").resolve()
        got = read_labelme(labelme)
        assert len(got) == len(masks) and all(np.array_equal(g, m) for (_, g), m in zip(got, masks))
        regions = [r for r in tasks[k]["predictions"][0]["result"]]
        got = [ls_rle_to_mask(r["value"]["rle"], h, w) for r in regions]
        assert len(got) == len(masks) and all(np.array_equal(g, m) for g, m in zip(got, masks))
        assert all(r["value"]["brushlabels"] == ["cell"] for r in regions)
        got = geojson_masks(json.loads((out / "geojson" / f"{name}.geojson").read_text()), h, w)
        assert len(got) == len(masks) and all(np.array_equal(g, m) for g, m in zip(got, masks))
        pngs = sorted((out / f"{name}_masks").glob("*.png"))
        assert all(np.array_equal(np.asarray(Image.open(p)) > 0, m) for p, m in zip(pngs, masks))
    done = O.read_done(out, ".samhq-everything.done")
    assert done["a"] == {"a.json", "a_masks", "a_overlay.png", "yolo/labels/a.txt", "labelme/a.json", "geojson/a.geojson"}
    assert not (out / O.LOCK_FILE).exists() and not list(out.glob(O.TMP_PREFIX + "*"))

    # a rerun skips both images and writes the same whole-run files; a missing file of one format redoes its image
    before = (out / "coco" / "instances.json").read_text()
    (out / "yolo" / "labels" / "a.txt").unlink()
    assert everything(setup, out, "--format", ALL, "--category", "cell") == 0
    assert "1 images done, 1 skipped" in capsys.readouterr().out
    assert (out / "coco" / "instances.json").read_text() == before and (out / "yolo" / "labels" / "a.txt").exists()


def test_an_image_is_done_only_when_all_its_files_are(setup, tmp_path, monkeypatch, capsys):
    """A write failing in one format's file (the LabelMe JSON of the second image) keeps none of that image's
    files and does not journal it; the rerun finishes it."""
    out = tmp_path / "out"
    real = O.write_file

    def fail_on_labelme_b(path, write):
        if path.parent.name == "sub" and path.parent.parent.name == "labelme":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, write)

    monkeypatch.setattr(O, "write_file", fail_on_labelme_b)
    assert everything(setup, out, "--format", "json,yolo,labelme") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "a rerun redoes it" in err
    assert set(O.read_done(out, ".samhq-everything.done")) == {"a"}
    assert not (out / "sub" / "b.json").exists() and not (out / "yolo" / "labels" / "sub" / "b.txt").exists()
    assert not list(out.glob(O.TMP_PREFIX + "*"))
    monkeypatch.setattr(O, "write_file", real)
    assert everything(setup, out, "--format", "json,yolo,labelme") == 0
    assert "1 images done, 1 skipped" in capsys.readouterr().out
    assert (out / "labelme" / "sub" / "b.json").exists() and (out / "yolo" / "data.yaml").exists()


def test_segment_formats_into_one_dataset(setup, tmp_path, capsys):
    from pycocotools.coco import COCO

    from samhq import SamHQPredictor
    from samhq.formats import read_yolo
    from samhq.modeling.model import SamHQModel

    out = tmp_path / "labels"
    base = ["segment", "--model", str(setup / "model"), "--threads", "1", "--out", str(out)]
    boxes = ["--box", "8,8,40,44", "--box", "50,20,90,60"]
    fmt = ["--format", "json,png,coco,yolo", "--category", "shape"]
    assert main(base[:1] + [str(setup / "in" / "a.png")] + base[1:] + boxes + fmt) == 0
    assert main(base[:1] + [str(setup / "in" / "sub" / "b.png")] + base[1:] + ["--box", "50,20,90,60"] + fmt) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'a.json'}" in printed and "mask 1:" in printed
    predictor = SamHQPredictor(SamHQModel.from_pretrained(setup / "model"))
    coco = COCO(str(out / "coco" / "instances.json"))
    inputs = [str(setup / "in" / "a.png"), str(setup / "in" / "sub" / "b.png")]
    assert [im["file_name"] for im in coco.dataset["images"]] == inputs
    assert coco.dataset["categories"][0]["name"] == "shape"
    for k, (name, bxs) in enumerate((("a", [[8, 8, 40, 44], [50, 20, 90, 60]]), ("b", [[50, 20, 90, 60]]))):
        predictor.set_image(np.asarray(Image.open(setup / "in" / ("sub/" if name == "b" else "") / f"{name}.png")))
        want = [predictor.predict(box=np.array(b), multimask_output=False)[0][0] for b in bxs]
        doc = json.loads((out / f"{name}.json").read_text())
        assert [m["prompt"]["box"] for m in doc["masks"]] == bxs
        assert all(np.array_equal(coco_to_mask(m["segmentation"]), w) for m, w in zip(doc["masks"], want))
        assert all(np.array_equal(coco.annToMask(a).astype(bool), w) for a, w in zip(coco.imgToAnns[k + 1], want))
        got = read_yolo((out / "yolo" / "labels" / f"{name}.txt").read_text(), 72, 96)
        assert all(np.array_equal(g, w) for (_, g), w in zip(got, want))
        assert len(list((out / f"{name}_masks").glob("*.png"))) == len(bxs) and (out / f"{name}_overlay.png").exists()
    # existing outputs are kept unless --force
    assert main(base[:1] + [str(setup / "in" / "a.png")] + base[1:] + boxes + ["--format", "json"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(base[:1] + [str(setup / "in" / "a.png")] + base[1:] + boxes + ["--format", "json", "--force"]) == 0


def test_format_errors(setup, tmp_path, capsys):
    img = str(setup / "in" / "a.png")
    model = ["--model", str(setup / "model")]
    cases = [
        (["everything", img, "--out", str(tmp_path / "o"), "--format", "json,voc", *model], "unknown format 'voc'"),
        (["everything", img, "--out", str(tmp_path / "o"), "--format", "geotiff", *model], "needs --tiles"),
        (["everything", img, "--out", str(tmp_path / "o"), "--categories", "1=a", *model], "--category NAME"),
        (["segment", img, "--box", "1,1,9,9", "--format", "coco", *model], "give it with --out DIR"),
        (["segment", img, "--box", "1,1,9,9", "--format", "coco", "--out", str(tmp_path), "--json", "x.json", *model],
         "leave out --overlay and --json"),
        (["segment", img, "--box", "1,1,9,9", "--tile-size", "64", *model], "--tile-size needs --tiles"),
        (["segment", img, "--box", "1,1,9,9", "--ray", *model], "--ray runs many images"),
    ]
    for argv, text in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert text in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o").exists()
    assert O.parse_output_formats("both,COCO,geotiff,png") == (["json", "png"], ["coco"], ["geotiff"])

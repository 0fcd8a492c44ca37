"""What crosses the stage boundaries (issue 8): the encoded source instead of decoded pixels, the crops to
the anonymizer stage only, and typed face records. The stages run in this process, as the actors run them."""

from __future__ import annotations

import pickle

import numpy as np
from PIL import Image

from rp_distributed.config import anonymization_fingerprint, load_config
from rp_distributed.records import Face, ImageRow
from rp_distributed.stages.anonymize import AnonymizeFaces
from rp_distributed.stages.batch import columns as _columns
from rp_distributed.stages.batch import rows as _rows
from rp_distributed.stages.detect import DetectFaces
from rp_distributed.stages.merge import MergeAndWrite
from tests.conftest import FAST_DETECTION


def _detect(cfg, src, out):
    return DetectFaces.from_config(cfg).process(ImageRow(str(src), src.name, str(out)))


def _through(stage, row):
    (out,) = _rows(stage(_columns([row])))
    return out


def test_boundaries_carry_the_source_bytes_and_the_crops_only_to_the_anonymizer(tmp_path, t1_path, t1_rgb):
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png"])
    detected = _detect(cfg, t1_path, tmp_path / "t1.png")
    payload = detected.payload
    assert payload.image is None and payload.source == t1_path.read_bytes()
    assert len(payload.faces) == 6 and all(isinstance(f, Face) and f.crop is not None for f in payload.faces)
    crops = sum(f.crop.nbytes for f in payload.faces)
    # What Ray stores for the row: the JPEG and the crops, not the 3.4 MB of decoded pixels.
    assert len(pickle.dumps(detected, protocol=5)) < len(payload.source) + crops + 20_000 < t1_rgb.nbytes + crops
    anonymized = _through(AnonymizeFaces.from_config(cfg), detected)
    faces = anonymized.payload.faces
    assert all(f.crop is None and f.anon_crop is not None and str(f.method_applied) == "blur" for f in faces)
    assert len(pickle.dumps(anonymized, protocol=5)) < len(payload.source) + crops + 20_000


def test_merging_from_the_source_bytes_writes_what_merging_from_pixels_writes(tmp_path, t1_path, t1_rgb):
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=pixelate", "output.format=png"])
    fp = anonymization_fingerprint(cfg)
    merge = MergeAndWrite.from_config(cfg, "run", fp)
    outputs = []
    for name, as_pixels in (("from-bytes.png", False), ("from-pixels.png", True)):
        row = _through(AnonymizeFaces.from_config(cfg), _detect(cfg, t1_path, tmp_path / name))
        if as_pixels:  # what the stage shipped before: the decoded image
            row.payload.source, row.payload.image = None, t1_rgb
        rows = merge.process(row)
        assert {r["status"] for r in rows} == {"ok"} and len(rows) == 6
        outputs.append(np.asarray(Image.open(tmp_path / name)))
    assert np.array_equal(outputs[0], outputs[1])
    assert np.abs(outputs[0].astype(int) - t1_rgb.astype(int)).max() > 50  # the faces did change


def test_an_image_whose_file_is_larger_than_its_pixels_travels_decoded(tmp_path, t1_rgb):
    src = tmp_path / "t1.bmp"
    Image.fromarray(t1_rgb).save(src)  # uncompressed: the pixels plus a header
    assert src.stat().st_size > t1_rgb.nbytes
    payload = _detect(load_config(None, [*FAST_DETECTION, "anonymizer.method=blur"]), src, tmp_path / "out.bmp").payload
    assert payload.source is None and np.array_equal(payload.image, t1_rgb) and len(payload.faces) == 6


def test_the_payload_crosses_ray_blocks_as_one_binary_cell_per_row(tmp_path, t1_path):
    """Ray stores a payload column of bytes as Arrow binary, as it is. Handed ``ImagePayload`` objects instead, it
    first tries an Arrow conversion whose error spells out every row's arrays as text, then pickles them one by
    one: that cost more per image than the mask method itself."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=mask", "output.format=png"])
    detected = _detect(cfg, t1_path, tmp_path / "t1.png")
    block = BlockAccessor.batch_to_block(_columns([detected]))
    assert pa.types.is_binary(block.schema.field("payload").type)
    (back,) = _rows(BlockAccessor.for_block(block).to_batch_format("numpy"))
    assert back.payload.source == detected.payload.source and len(back.payload.faces) == 6
    for a, b in zip(back.payload.faces, detected.payload.faces):
        assert np.array_equal(a.box, b.box) and np.array_equal(a.crop, b.crop)

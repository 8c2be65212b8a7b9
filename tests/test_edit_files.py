"""The Edit type: files round-trip bit-exactly, bad files are refused, nothing is unpickled."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conceptedit.editing import arch
from conceptedit.editing.edit import Change, Edit, combine
from conceptedit.editing.errors import EditFileError, FingerprintMismatchError, NonFiniteError


def _edit(fam="tiny"):
    f = arch.get_family(fam)
    shapes = f.expected_shapes()
    g = torch.Generator().manual_seed(0)
    kk, kf = f.attn2_kv_keys()[0], f.ffn_out_keys()[0]
    ch = {
        kk: Change("lowrank", shapes[kk], {"up": torch.randn(shapes[kk][0], 2, generator=g),
                                           "down": torch.randn(2, shapes[kk][1], generator=g)}),
        f.attn2_kv_keys()[1]: Change("delta", shapes[f.attn2_kv_keys()[1]], {"delta": torch.randn(shapes[f.attn2_kv_keys()[1]], generator=g)}),
        kf: Change("mask", shapes[kf], {"index": torch.tensor([0, 5, 77], dtype=torch.int32)}),
    }
    return Edit("uce+concept_prune", fam, ch, concepts=["circle"], params={"a": 1}, fingerprint={"family": fam, "layout": "x", "weights": "y"})


def test_save_load_roundtrip_bit_exact(tmp_path):
    e = _edit()
    p = e.save(tmp_path / "e.safetensors")
    e2 = Edit.load(p)
    assert e2.method == "uce+concept_prune" and e2.concepts == ["circle"] and e2.params == {"a": 1}
    assert set(e2.changes) == set(e.changes)
    for k in e.changes:
        for n, t in e.changes[k].tensors.items():
            assert torch.equal(t, e2.changes[k].tensors[n])
    assert not os.path.exists(str(p) + ".tmp")


def test_mask_delta_zeroes_exactly_the_mask():
    e = _edit()
    k = arch.get_family("tiny").ffn_out_keys()[0]
    w = torch.randn(e.changes[k].shape)
    d = e.changes[k].delta(w)
    out = (w + d).reshape(-1)
    assert out[[0, 5, 77]].abs().sum() == 0
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[[0, 5, 77]] = False
    assert torch.equal(out[keep], w.reshape(-1)[keep])


def test_refuses_non_safetensors_and_foreign_files(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"\x80\x04pickle")
    with pytest.raises(EditFileError, match="only .safetensors"):
        Edit.load(bad)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(EditFileError, match="LoraLoader"):
        Edit.load(lora)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file")
    with pytest.raises(EditFileError):
        Edit.load(junk)


def test_refuses_inconsistent_metadata(tmp_path):
    e = _edit()
    tensors, meta = e.to_tensors()
    m = json.loads(meta["conceptedit"])
    k = next(iter(m["entries"]))
    m["entries"][k]["shape"] = [3, 3]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"conceptedit": json.dumps(m)})
    with pytest.raises(EditFileError):
        Edit.load(tmp_path / "bad.safetensors")


def test_nan_edit_is_refused(tmp_path):
    e = _edit()
    k = arch.get_family("tiny").attn2_kv_keys()[1]
    e.changes[k].tensors["delta"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        e.save(tmp_path / "nan.safetensors")


def test_validate_names_the_family():
    e = _edit("tiny")
    shapes = arch.get_family("sd1").expected_shapes()
    with pytest.raises(FingerprintMismatchError, match="computed for ConceptEdit tiny; the model is SD1.x"):
        e.validate_for("sd1", shapes)
    tiny_shapes = arch.get_family("tiny").expected_shapes()
    warns = e.validate_for("tiny", tiny_shapes, {"family": "tiny", "layout": "x", "weights": "other"})
    assert warns and "different checkpoint" in warns[0]
    with pytest.raises(FingerprintMismatchError, match="layout"):
        e.validate_for("tiny", tiny_shapes, {"family": "tiny", "layout": "z", "weights": "y"})


def test_combine_adds_deltas_and_unions_masks():
    a, b = _edit(), _edit()
    k = arch.get_family("tiny").attn2_kv_keys()[1]
    b.changes[arch.get_family("tiny").ffn_out_keys()[0]] = Change(
        "mask", a.changes[arch.get_family("tiny").ffn_out_keys()[0]].shape, {"index": torch.tensor([5, 9])})
    c = combine([(a, 1.0), (b, 1.0)])
    assert torch.allclose(c.changes[k].delta(), 2 * a.changes[k].delta())
    idx = c.changes[arch.get_family("tiny").ffn_out_keys()[0]].tensors["index"]
    assert sorted(idx.tolist()) == [0, 5, 9, 77]
    with pytest.raises(ValueError, match="strength 1"):
        combine([(a, 1.0), (b, 0.5)])

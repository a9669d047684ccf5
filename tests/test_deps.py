"""raymine._deps: FAISS imported with a message naming the extra; transformers' load report kept quiet."""
from __future__ import annotations

import logging
import sys

import pytest

from raymine._deps import from_pretrained_quiet, import_faiss
from raymine.errors import MissingDependencyError, UserError


def test_import_faiss_returns_the_module():
    faiss = import_faiss()
    assert hasattr(faiss, "IndexFlatIP")


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    with pytest.raises(ImportError) as info:
        import_faiss()
    e = info.value
    assert isinstance(e, MissingDependencyError) and isinstance(e, UserError)
    assert "raymine[cpu]" in str(e) and "raymine[gpu]" in str(e) and "search.backend=torch" in str(e)


def _report_lines(capsys, caplog) -> list[str]:
    text = capsys.readouterr().err + "\n".join(r.getMessage() for r in caplog.records)
    return [line for line in text.splitlines() if "LOAD REPORT" in line or "MISSING" in line or "UNEXPECTED" in line]


def test_student_load_without_pooler_report(minilm_path, tmp_path, capsys, caplog):
    from transformers import AutoModel

    caplog.set_level(logging.INFO)
    no_pooler = from_pretrained_quiet(AutoModel, minilm_path, add_pooling_layer=False)  # surplus pooler weights
    assert no_pooler.pooler is None
    no_pooler.save_pretrained(tmp_path / "student")  # a trained student is saved without its pooler
    reloaded = from_pretrained_quiet(AutoModel, str(tmp_path / "student"))  # pooler missing from the checkpoint
    assert reloaded.pooler is not None
    assert _report_lines(capsys, caplog) == []
    # the plain call prints the report these wrap (so the test above means something)
    AutoModel.from_pretrained(str(tmp_path / "student"))
    assert any("MISSING" in line for line in _report_lines(capsys, caplog))


def test_missing_weights_that_matter_are_still_reported(minilm_path, tmp_path, caplog):
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path, add_pooling_layer=False)
    model.save_pretrained(tmp_path / "m")
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    dropped = [k for k in weights if "encoder.layer.5.output.dense" in k]
    assert dropped
    save_file({k: v for k, v in weights.items() if k not in dropped}, str(tmp_path / "m" / "model.safetensors"),
              metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="raymine._deps"):
        from_pretrained_quiet(AutoModel, str(tmp_path / "m"), add_pooling_layer=False, dtype=torch.float32)
    warnings = [r.getMessage() for r in caplog.records if r.name == "raymine._deps"]
    assert len(warnings) == 1 and "encoder.layer.5.output.dense" in warnings[0] and "newly initialised" in warnings[0]

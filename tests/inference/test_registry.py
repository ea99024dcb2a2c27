"""registry: scanning models/, refusing bad files and names, active model + rollback state."""
from __future__ import annotations

import pytest

from inference import default_model, hub, registry
from inference.errors import InferenceError
from tests.support.models import link_model


def test_scan_lists_quant_and_marks_bad_files(models_dir, smollm2_path):
    (models_dir / "garbage.Q4_K_M.gguf").write_bytes(b"not a gguf at all" * 100)
    (models_dir / "truncated.Q4_1.gguf").write_bytes(smollm2_path.read_bytes()[: 40_000_000])
    (models_dir / "empty.gguf").write_bytes(b"")
    infos = {i.name: i for i in registry.scan(models_dir)}
    good = infos[default_model.SMOLLM2_FILENAME]
    assert good.usable and good.quant == "Q4_1" and good.version == "SmolLM2-135M-Instruct"
    for bad in ("garbage.Q4_K_M.gguf", "truncated.Q4_1.gguf", "empty.gguf"):
        assert not infos[bad].usable, bad
        assert infos[bad].error and "unusable" in infos[bad].label


def test_llama_cpps_header_parser_reads_what_gguf_py_reads(smollm2_path, tmp_path):
    """The registry reads headers with llama.cpp's parser (milliseconds, where gguf-py's reader
    takes seconds for a 49k-token vocabulary): same facts as gguf-py's, bad files refused."""
    from gguf import GGUFReader

    from inference import gguf_header

    header, reader = gguf_header.read(smollm2_path), GGUFReader(str(smollm2_path))
    assert header.data_end == max(t.data_offset + t.n_bytes for t in reader.tensors)
    assert header.data_end <= smollm2_path.stat().st_size
    field = reader.fields["general.file_type"]
    assert header.file_type == int(field.parts[field.data[0]][0])
    assert header.n_layer == 30 == int(reader.fields["llama.block_count"].parts[-1][0])
    assert header.gguf_type in ("", "model")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    with pytest.raises(gguf_header.GGUFError):
        gguf_header.read(tmp_path / "bad.gguf")


def test_missing_models_dir_is_empty_not_an_error(tmp_path):
    assert registry.scan(tmp_path / "nope") == []


@pytest.mark.parametrize("name", ["../models/x.gguf", "/etc/passwd", "..", "", "a/b.gguf",
                                  "..\\x.gguf", "missing.gguf"])
def test_resolve_refuses_paths_and_unknown_names(models_dir, name):
    with pytest.raises(InferenceError):
        registry.resolve(models_dir, name)


def test_resolve_refuses_unusable_file(models_dir):
    (models_dir / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(InferenceError, match="unusable"):
        registry.resolve(models_dir, "bad.gguf")


def test_active_history_and_rollback(models_dir, smollm2_path):
    link_model(smollm2_path, models_dir, "v2.Q4_K_M.gguf")
    registry.write_active(models_dir, default_model.SMOLLM2_FILENAME)
    registry.write_active(models_dir, "v2.Q4_K_M.gguf")
    assert registry.read_active(models_dir)["active"] == "v2.Q4_K_M.gguf"
    assert registry.pop_previous(models_dir) == default_model.SMOLLM2_FILENAME
    assert registry.read_active(models_dir)["active"] == default_model.SMOLLM2_FILENAME
    with pytest.raises(InferenceError, match="roll back"):
        registry.pop_previous(models_dir)


def test_version_and_card(models_dir):
    assert registry.version_of("acme-ft-20261123.Q5_K_M.gguf") == "acme-ft-20261123"
    (models_dir / "SmolLM2-135M-Instruct.card.json").write_text('{"base": "x"}')
    info = registry.resolve(models_dir, default_model.SMOLLM2_FILENAME)
    assert info.card == {"base": "x"}


def test_ensure_default_model_offline_fallback(tmp_path, smollm2_path, caplog):
    """A Hub model that cannot be fetched costs one log line; SmolLM2 is served instead."""
    models = tmp_path / "m"
    link_model(smollm2_path, models)
    preferred = hub.fetch_default("nobody/no-such-repo/model.Q4_K_M.gguf", models)
    name = default_model.ensure_default_model(models, preferred)
    assert preferred == ""
    assert name == default_model.SMOLLM2_FILENAME
    assert any("unavailable" in r.message for r in caplog.records)

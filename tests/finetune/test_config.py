"""FinetuneConfig: presets, (de)serialisation, field specs (sections, labels) for the CLI and the
Admin form, validation messages."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest

from finetune import FinetuneError
from finetune.config import LR_SCHEDULERS, SECTIONS, FinetuneConfig, config_fields, from_preset
from finetune.presets import PRESETS


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    return str(path)


def test_presets_suit_their_models(dataset):
    assert set(PRESETS) == {"smollm2-135m", "phi-3.5-mini", "mistral-7b"}
    phi = from_preset("phi-3.5-mini", dataset=dataset).validate()
    assert phi.modules() == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert "q_proj" in from_preset("mistral-7b", dataset=dataset).validate().modules()
    smol = from_preset("smollm2-135m", dataset=dataset, lora_r=8).validate()
    assert smol.base_model == "smollm2-135m" and smol.lora_r == 8
    assert smol.output_prefix() == "smollm2-135m-ft"
    assert smol.attn_implementation == "sdpa"  # too short a run to repay flex's compilation
    assert phi.attn_implementation == "auto" and phi.lora_dropout == 0.0
    with pytest.raises(FinetuneError, match="Unknown preset 'llama'.*smollm2-135m"):
        from_preset("llama")


def test_round_trips_through_json(dataset):
    config = from_preset("phi-3.5-mini", dataset=dataset, eval_prompts=["Hi?"], seed=7)
    again = FinetuneConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_from_dict_coerces_form_values_and_names_unknown_keys():
    config = FinetuneConfig.from_dict({
        "base_model": "smollm2-135m", "dataset": "d.jsonl", "lora_r": 8.0, "num_epochs": "2",
        "packing": "false", "load_in_4bit": "auto", "quant_types": "q4_k_m, Q8_0",
        "target_modules": "q_proj, v_proj"})
    assert (config.lora_r, config.num_epochs, config.packing, config.load_in_4bit) == \
        (8, 2.0, False, None)
    assert config.quant_types == ["q4_k_m", "Q8_0"] and config.modules() == ["q_proj", "v_proj"]
    with pytest.raises(FinetuneError, match="'lr' \\(did you mean 'learning_rate'\\?\\)"):
        FinetuneConfig.from_dict({"base_model": "x", "dataset": "y", "lr": 1e-4})
    with pytest.raises(FinetuneError, match="lora_r: 8.5 is not a valid int"):
        FinetuneConfig.from_dict({"base_model": "x", "dataset": "y", "lora_r": 8.5})


def test_field_specs_feed_a_cli():
    specs = {s.name: s for s in config_fields()}
    assert list(specs)[:2] == ["base_model", "dataset"]
    assert specs["base_model"].required and not specs["lora_r"].required
    assert (specs["lora_r"].kind, specs["lora_r"].default) == ("int", 16)
    assert specs["load_in_4bit"].kind == "optional_bool"
    assert specs["quant_types"].default == ["Q4_K_M", "Q5_K_M"]
    assert "cosine" in specs["lr_scheduler"].choices
    assert all(s.help for s in specs.values())


def test_validation_lists_every_problem_with_a_fix(tmp_path, dataset):
    config = FinetuneConfig(base_model="no such model", dataset=str(tmp_path / "missing.jsonl"),
                            lora_r=0, learning_rate=3.0, val_split=0.9, max_steps=0,
                            compute_dtype="f16", quant_types=["Q4_K_M", "IQ2_XS"],
                            output_name="bad name!")
    with pytest.raises(FinetuneError) as caught:
        config.validate()
    message = str(caught.value)
    for expected in ["base_model 'no such model' is not a preset",
                     "missing.jsonl not found", "output_name 'bad name!'",
                     "lora_r must be between 1 and 1024 (got 0)",
                     "learning_rate must be in (0, 0.1] (got 3.0)",
                     "max_steps must be -1", "val_split must be -1 (auto) or between 0 and 0.5",
                     "compute_dtype 'f16' is not one of auto, bf16, fp16, fp32",
                     "quant_types ['IQ2_XS']: choose from"]:
        assert expected in message


@pytest.mark.parametrize("changes, match", [
    ({"dataset": ""}, "dataset is empty"),
    ({"dataset": "notes.txt"}, "unsupported file type .txt"),
    ({"lora_dropout": 1.0}, "lora_dropout must be in"),
    ({"target_modules": "q_proj;v_proj"}, "target_modules"),
    ({"max_seq_length": 8}, "max_seq_length must be between 32"),
    ({"gradient_accumulation": 0}, "gradient_accumulation must be between 1"),
    ({"num_epochs": 0}, "num_epochs must be in"),
    ({"optimizer": "sgd"}, "optimizer 'sgd' is not one of"),
    ({"eval_prompts": ["  "]}, "eval_prompts must be non-empty"),
])
def test_single_bad_values(tmp_path, dataset, changes, match):
    (tmp_path / "notes.txt").write_text("x")
    values = {"base_model": "smollm2-135m", "dataset": dataset, **changes}
    if values["dataset"] == "notes.txt":
        values["dataset"] = str(tmp_path / "notes.txt")
    with pytest.raises(FinetuneError, match=match):
        FinetuneConfig(**values).validate()


def test_accepted_sources(tmp_path, dataset):
    folder = tmp_path / "model"
    folder.mkdir()
    for base in ["smollm2-135m", "mistral-7b", "Qwen/Qwen2.5-0.5B-Instruct", str(folder)]:
        FinetuneConfig(base_model=base, dataset=dataset).validate()
    for name in ["tatsu-lab/alpaca", "squad"]:  # Hub dataset names are checked at load time
        FinetuneConfig(base_model="smollm2-135m", dataset=name).validate()
    assert FinetuneConfig(base_model="smollm2-135m", dataset=dataset, max_steps=5,
                          num_epochs=0).validate().max_steps == 5  # max_steps wins


def test_every_field_has_a_section_and_a_label():
    specs = config_fields()
    for spec in specs:
        assert spec.section in SECTIONS, spec.name
        assert spec.label.strip() and len(spec.label) <= 40, spec.name
    labels = [s.label for s in specs]
    assert len(set(labels)) == len(labels)  # the form finds its widgets by label
    assert {s.section for s in specs} == set(SECTIONS)  # no section left empty


def test_help_texts_state_rules_not_measurements():
    for spec in config_fields():
        assert not re.search(r"[HA]100|RTX|\b20\d\d\b|\d(\.\d+)?x (faster|as long)|~\d+%",
                             spec.help), (spec.name, spec.help)


def test_validate_leaves_the_config_unchanged_and_returns_a_normalised_copy(dataset):
    config = FinetuneConfig(base_model="smollm2-135m", dataset=dataset,
                            quant_types=["q4_k_m", " q8_0 "])
    before = dataclasses.replace(config, quant_types=list(config.quant_types))
    checked = config.validate()
    assert config == before and config.quant_types == ["q4_k_m", " q8_0 "]
    assert checked.quant_types == ["Q4_K_M", "Q8_0"]
    assert checked == dataclasses.replace(config, quant_types=["Q4_K_M", "Q8_0"])
    assert checked.validate() == checked  # validating again changes nothing
    bad = FinetuneConfig(base_model="smollm2-135m", dataset=dataset, quant_types=["iq2_xs"])
    with pytest.raises(FinetuneError, match="quant_types"):
        bad.validate()
    assert bad.quant_types == ["iq2_xs"]


def test_cli_groups_the_run_flags_by_section():
    from finetune.__main__ import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    groups = {g.title: [a.dest for a in g._group_actions] for g in run._action_groups}
    titles = [f"{section} settings" for section in SECTIONS]
    assert [t for t in groups if t.endswith(" settings")] == titles  # the fixed order
    grouped = [dest for title in titles for dest in groups[title]]
    assert sorted(grouped) == sorted(s.name for s in config_fields())  # each field once
    for spec in config_fields():
        assert spec.name in groups[f"{spec.section} settings"]
    assert {"preset", "detach", "models_dir", "jobs_dir"} <= set(groups["options"])
    flags = {a.dest: a for a in run._actions}
    assert flags["learning_rate"].option_strings == ["--learning-rate", "--lr"]
    assert tuple(flags["lr_scheduler"].choices) == LR_SCHEDULERS
    assert isinstance(flags["packing"], argparse.BooleanOptionalAction)
    assert flags["quant_types"].nargs == "+" and flags["lora_r"].type is int


def test_admin_form_shows_a_few_settings_and_every_other_one_under_advanced():
    import gradio as gr

    from finetune.ui import admin_tab

    visible, advanced = admin_tab.form_layout()
    assert [s.name for s in visible] == list(admin_tab.VISIBLE)
    shown = [section for section, _ in advanced]
    assert shown == [section for section in SECTIONS if section in shown]  # in SECTIONS order
    in_advanced = [s.name for _, group in advanced for s in group]
    every = [s.name for s in config_fields() if s.name not in admin_tab.DATA_FIELDS]
    assert sorted(in_advanced + list(admin_tab.VISIBLE)) == sorted(every)  # each once
    for section, group in advanced:
        assert all(s.section == section for s in group)
    # /admin_start: the legacy positions first, then the rest in config_fields() order
    start = admin_tab.start_fields()
    assert sorted(start) == sorted(every)
    assert start[:len(admin_tab.LEGACY_FIELDS)] == list(admin_tab.LEGACY_FIELDS)
    rest = start[len(admin_tab.LEGACY_FIELDS):]
    assert rest == [n for n in every if n in rest]

    with gr.Blocks():
        widgets = admin_tab._training_inputs()
    assert set(widgets) == set(every)
    specs = {s.name: s for s in config_fields()}

    def accordions(widget) -> list[str]:
        found, parent = [], widget.parent
        while parent is not None:
            if isinstance(parent, gr.Accordion):
                found.append(parent.label)
            parent = parent.parent
        return found

    for name, widget in widgets.items():
        spec = specs[name]
        assert widget.label == spec.label and widget.info.startswith(spec.help)
        if name in admin_tab.VISIBLE:
            assert accordions(widget) == []
        else:
            assert accordions(widget) == [spec.section[0].upper() + spec.section[1:],
                                          "Advanced settings"]
        kind = (gr.CheckboxGroup if name == "quant_types" else
                gr.Dropdown if spec.choices or spec.kind == "optional_bool" else
                gr.Checkbox if spec.kind == "bool" else
                gr.Number if spec.kind in ("int", "float") else gr.Textbox)
        assert type(widget) is kind, name
    assert widgets["packing"].choices == [("auto", "auto"), ("on", "on"), ("off", "off")]
    assert widgets["packing"].value == "auto"
    assert "smollm2-135m: off" in widgets["gradient_checkpointing"].info  # the preset's own
    assert "preset" not in widgets["gradient_accumulation"].info  # a legacy field: it applies


def test_admin_form_values_become_config_values():
    from finetune.ui import admin_tab

    specs = {s.name: s for s in config_fields()}
    assert admin_tab._from_form(specs["packing"], "on") is True
    assert admin_tab._from_form(specs["host_embeddings"], "auto") is None
    assert admin_tab._from_form(specs["eval_prompts"], "Hi, who are you?\n\n Why? ") == \
        ["Hi, who are you?", "Why?"]
    assert admin_tab._from_form(specs["target_modules"], "q_proj, v_proj") == "q_proj, v_proj"
    assert specs["lora_r"].coerce(8.0) == 8 and specs["num_epochs"].coerce("2") == 2.0

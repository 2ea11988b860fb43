"""Parameters: one dataclass per notebook, YAML keys = fields, clear errors, fast CLI validation."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vinakit.errors import ParamsError
from vinakit.params import NOTEBOOK_PARAMS, CPTParams, PreferenceParams, SFTParams, params_class, read_yaml

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
YAML_FILES = sorted((REPO / "params").rglob("*.yaml"))


def parameters_cell(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name} must have exactly one cell tagged 'parameters'"
    return "".join(tagged[0]["source"])


def test_every_notebook_has_a_params_class():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        assert path.stem in NOTEBOOK_PARAMS, f"{path.name} has no params dataclass in vinakit.params"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_equals_dataclass_defaults(path: Path):
    """The cell holds only annotated literals with a comment each, equal to the dataclass defaults."""
    source = parameters_cell(path)
    tree = ast.parse(source)
    cls = params_class(path.stem)
    defaults = cls().to_dict()
    seen = set()
    lines = source.splitlines()
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), f"{path.name}: only annotated assignments, got {ast.dump(node)}"
        name = node.target.id
        seen.add(name)
        assert ast.literal_eval(node.value) == defaults[name], f"{path.name}: {name} differs from the dataclass"
        assert "#" in lines[node.lineno - 1], f"{path.name}: parameter {name} needs a '# why' comment"
    assert seen == set(defaults), f"{path.name}: cell and dataclass differ: {seen ^ set(defaults)}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_preset_validates_for_every_notebook(path: Path):
    for cls in NOTEBOOK_PARAMS.values():
        cls.from_sources([path])


def test_unknown_name_suggests_closest():
    with pytest.raises(ParamsError, match="Did you mean 'rank'"):
        SFTParams.validate({"rnak": 8})
    with pytest.raises(ParamsError, match="learning_rate"):
        SFTParams.from_sources([], [("learnig_rate", "1e-4")])


@pytest.mark.parametrize("name,value,expected", [
    ("rank", "8", "must be an integer"),
    ("load_in_4bit", "yes", "must be true or false"),
    ("learning_rate", "fast", "must be a number"),
    ("backend", "unslot", "Did you mean 'unsloth'"),
    ("sample_prompts", "Xin chào", "must be a list"),
])
def test_wrong_type_is_rejected(name, value, expected):
    with pytest.raises(ParamsError, match=expected):
        SFTParams.validate({name: value})


def test_cli_strings_are_converted_to_field_types():
    params = SFTParams.from_sources([], [("rank", "64"), ("learning_rate", "2e-4"), ("load_in_4bit", "false"),
                                         ("run_name", "thử-nghiệm"), ("num_train_epochs", "2")])
    assert (params.rank, params.learning_rate, params.load_in_4bit) == (64, 2e-4, False)
    assert params.run_name == "thử-nghiệm" and params.num_train_epochs == 2.0


def test_cross_field_checks():
    with pytest.raises(ParamsError, match="load_in_4bit"):
        SFTParams.validate({"full_finetuning": True, "load_in_4bit": True})
    with pytest.raises(ParamsError, match="plain folder name"):
        SFTParams.validate({"run_name": "../escape"})
    with pytest.raises(ParamsError, match="max_steps"):
        SFTParams.validate({"max_steps": 0})


def test_yaml_sections_and_shared_keys(tmp_path: Path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model_name: tiny-vi\nrank: 4\nsft:\n  rank: 8\n  dataset: data.jsonl\n", encoding="utf-8")
    params = SFTParams.from_sources([preset])
    assert (params.model_name, params.rank, params.dataset) == ("tiny-vi", 8, "data.jsonl")
    preset.write_text("sft:\n  rnak: 8\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"section 'sft' of .*p\.yaml.*Did you mean 'rank'"):
        SFTParams.from_sources([preset])
    preset.write_text("mdoel_name: x\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="Did you mean 'model_name'"):
        SFTParams.from_sources([preset])
    preset.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="mapping"):
        read_yaml(preset)


def test_from_namespace_ignores_code_and_objects_but_not_typos():
    namespace = {"rank": 8, "json": json, "Path": Path, "_private": 1, "In": [], "run": object(),
                 "model_name": "tiny-vi"}
    params = SFTParams.from_namespace(namespace)
    assert params.rank == 8 and params.model_name == "tiny-vi"
    with pytest.raises(ParamsError, match="Did you mean 'rank'"):
        SFTParams.from_namespace({**namespace, "rnak": 16})
    # a shared YAML file passed to plain papermill injects other notebooks' keys and sections: ignored
    other = {name for cls in NOTEBOOK_PARAMS.values() for name in cls.field_types()} - set(SFTParams.field_types())
    extra = {name: 1 for name in list(other)[:3]}
    assert SFTParams.from_namespace({**namespace, **extra, "sft": {"rank": 4}}).rank == 4


def test_cli_rejects_a_typo_before_any_kernel_starts(tmp_path: Path):
    # Checked by what ran, not by the clock: the failing call imports neither papermill nor torch.
    code = ("import sys\nfrom vinakit.cli import main\n"
            f"rc = main(['run', 'sft', '-f', {str(REPO / 'params' / 'cpu_tiny.yaml')!r}, '-p', 'rnak', '8', "
            f"'-p', 'output_dir', {str(tmp_path)!r}])\n"
            "print(sorted(m for m in ('papermill', 'torch', 'transformers') if m in sys.modules))\nsys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "Did you mean 'rank'" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", "validation must not start papermill or torch"
    assert not any(tmp_path.iterdir()), "no run folder may be created for invalid parameters"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_parses_every_parameter(path: Path):
    """papermill reads the same names (a comment with '=' would hide a parameter from it)."""
    import papermill

    found = papermill.inspect_notebook(str(path))
    assert set(found) == set(params_class(path.stem).field_types())


# --- floats written the YAML 1.2 way, repo ids by the Hub's rules ------------------------------------------------


@pytest.mark.parametrize("text,expected", [("1e-3", 1e-3), ("5E-5", 5e-5), ("+2e+4", 2e4),
                                           (" 3e-4 ", 3e-4), ("0.5", 0.5), (".5", 0.5), ("2", 2.0)])
def test_float_fields_accept_the_yaml_1_2_forms_pyyaml_leaves_as_strings(text: str, expected: float):
    assert SFTParams.validate({"learning_rate": text}).learning_rate == expected


def test_a_yaml_preset_with_1e_3_is_accepted(tmp_path: Path):
    preset = tmp_path / "lr.yaml"
    preset.write_text("# tốc độ học: 1e-3\nlearning_rate: 1e-3\ncpt:\n  embedding_learning_rate: 1E-4\n",
                      encoding="utf-8")
    assert read_yaml(preset)["learning_rate"] == "1e-3"  # what PyYAML (YAML 1.1) gives
    assert SFTParams.from_sources([preset]).learning_rate == 1e-3
    cpt = params_class("cpt").from_sources([preset])
    assert (cpt.learning_rate, cpt.embedding_learning_rate) == (1e-3, 1e-4)


@pytest.mark.parametrize("text", ["1e", "e-3", "1e-3x", "1,5", "1_000", "0x10", "mười", ""])
def test_strings_that_are_not_floats_are_still_refused(text: str):
    with pytest.raises(ParamsError, match=r"'learning_rate'.*must be a number, got str"):
        SFTParams.validate({"learning_rate": text})


BAD_REPO_IDS = [
    ("user/..", "'--' or '..'"), ("../x", "'--' or '..'"), ("user/-bad-", "starts or ends with"),
    ("user/a--b", "'--' or '..'"), ("user/" + "a" * 97, "97 characters"), ("user/mô-hình", "'ô'"),
    ("user/.an", "starts or ends with"), ("a/b/c", "exactly one '/'"), ("chỉ-một-tên", "exactly one '/'"),
    ("/x", "owner is empty"), ("user/x.git", "'.git'"), ("user/tên mô hình", "' '"),
]


@pytest.mark.parametrize("repo_id,words", BAD_REPO_IDS, ids=[r[:20] for r, _ in BAD_REPO_IDS])
def test_repo_id_follows_the_hub_naming_rules(repo_id: str, words: str):
    from vinakit.params import ExportParams

    with pytest.raises(ParamsError, match=r"repo_id .* breaks the Hugging Face Hub's naming rules") as caught:
        ExportParams.validate({"repo_id": repo_id})
    assert words in str(caught.value) and "your-user/" in str(caught.value)


def test_repo_ids_accepted_here_are_accepted_by_huggingface_hub():
    from huggingface_hub.utils import validate_repo_id

    from vinakit.params import ExportParams, _repo_id_problem

    good = ["vina-user/tiny-vi-chat", "u/a.b_c-d", "_org/x_", "user/" + "a" * 96, "Qwen/Qwen2.5-1.5B-Instruct"]
    for repo_id in good:
        assert ExportParams.validate({"repo_id": repo_id}).repo_id == repo_id
        validate_repo_id(repo_id)
    for repo_id, _ in BAD_REPO_IDS:
        assert _repo_id_problem(repo_id)
        with pytest.raises(ValueError):  # HFValidationError; the Hub itself refuses non-ASCII names too
            validate_repo_id(repo_id)


def test_the_second_repo_of_an_export_must_fit_the_name_limit_too():
    from vinakit.params import ExportParams
    from vinakit.publish import repo_names

    repo_id = "user/" + "a" * 92
    assert ExportParams.validate({"repo_id": repo_id, "push_to_hub": True, "save_methods": ["merged_16bit"]})
    with pytest.raises(ParamsError, match="98 characters once '-GGUF'"):
        ExportParams.validate({"repo_id": repo_id + "a", "push_to_hub": True, "save_methods": ["merged_16bit", "lora"]})
    longest = max(repo_names(repo_id[:-1], ["merged_16bit", "lora", "gguf"]).values(), key=len)
    assert len(longest) == len(repo_id[:-1]) + len("-GGUF")  # params checks the suffix publish really adds



@pytest.mark.parametrize(("cls", "bad", "unit"), [(SFTParams, [-1, 0.7], "rows"), (CPTParams, [0, 0.7], "documents"),
                                                  (PreferenceParams, [-1, 0.6], "pairs")])
def test_val_size_is_a_fraction_up_to_a_half_or_a_whole_count(cls, bad: list[float], unit: str):
    for value in bad:
        with pytest.raises(ParamsError, match=f"val_size must be a fraction in .* whole number of {unit}, got"):
            cls.validate({"val_size": value})
    assert cls.validate({"val_size": 0.1}).val_split == 0.1
    split = cls.validate({"val_size": 30}).val_split
    assert split == 30 and isinstance(split, int)

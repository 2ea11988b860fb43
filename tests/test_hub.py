"""The Hub interface: the token stays hidden, the local stand-in records calls, failures say what to do."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from vinakit.hub import (
    HubAuthError,
    HubError,
    HubNetworkError,
    HubRejectedError,
    HuggingFaceHub,
    LocalHub,
    Secret,
    assert_no_secret,
    default_hub,
    find_token,
    push_folder,
    what_to_do,
)

SENTINEL = "hf_SENTINEL0123456789abcdefXYZ"  # ASCII, like real tokens (HTTP headers are ASCII)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A small export-like folder with Vietnamese content."""
    model = tmp_path / "mô-hình"
    model.mkdir()
    (model / "README.md").write_text("# Mô hình tiếng Việt\nHòa bình, thuỷ lợi.\n", encoding="utf-8")
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    return model


def test_secret_never_shows_itself():
    token = Secret(SENTINEL, "HF_TOKEN")
    assert SENTINEL not in repr(token) and SENTINEL not in str(token) and SENTINEL not in f"{token}"
    assert "HF_TOKEN" in repr(token)
    assert token.reveal() == SENTINEL
    assert token.scrub(f"Authorization: Bearer {SENTINEL} failed") == "Authorization: Bearer *** failed"
    with pytest.raises(TypeError):
        pickle.dumps(token)


def test_find_token_reads_the_environment_only(monkeypatch: pytest.MonkeyPatch):
    assert find_token({"HF_TOKEN": SENTINEL}).reveal() == SENTINEL
    assert find_token({"HUGGING_FACE_HUB_TOKEN": SENTINEL}).source == "HUGGING_FACE_HUB_TOKEN"
    assert find_token({"HF_TOKEN": "  "}) is None  # blank is no token (no Colab here)
    assert find_token({}) is None
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    assert find_token().reveal() == SENTINEL


def test_assert_no_secret_refuses_text_with_the_token(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    with pytest.raises(HubError, match="README.md") as caught:
        assert_no_secret(f"token: {SENTINEL}", "README.md")
    assert SENTINEL not in str(caught.value)
    assert_no_secret("Hòa bình, thuỷ lợi.", "README.md")  # no token: fine
    other = Secret("hf_other_token_value_42", "Colab secret")
    with pytest.raises(HubError):
        assert_no_secret("hf_other_token_value_42", "card", token=other)


def test_default_hub_is_real_unless_the_stand_in_is_asked_for(tmp_path: Path):
    assert isinstance(default_hub({}), HuggingFaceHub)
    local = default_hub({"VINAKIT_HUB": f"local:{tmp_path}", "VINAKIT_HUB_FAIL": "network"})
    assert isinstance(local, LocalHub) and local.root == tmp_path and local.fail == "network"
    with pytest.raises(HubError, match="VINAKIT_HUB"):
        default_hub({"VINAKIT_HUB": "s3://bucket"})
    with pytest.raises(ValueError, match="fail"):
        LocalHub(tmp_path, fail="timeout")


def test_local_hub_records_calls_without_the_token(tmp_path: Path, folder: Path):
    hub = LocalHub(tmp_path / "hub")
    pushed = push_folder(hub, "người-dùng/mô-hình-vi", folder, token=Secret(SENTINEL, "HF_TOKEN"))
    assert pushed.private is True  # private by default
    calls = hub.calls()
    assert [c["call"] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0] == {"call": "create_repo", "repo_id": "người-dùng/mô-hình-vi", "private": True,
                        "token_given": True}
    assert calls[1]["files"] == ["README.md", "config.json"]
    uploaded = hub.repo_path("người-dùng/mô-hình-vi") / "README.md"
    assert uploaded.read_text(encoding="utf-8").startswith("# Mô hình tiếng Việt")
    assert SENTINEL not in hub.calls_path.read_text(encoding="utf-8")
    public = push_folder(hub, "người-dùng/công-khai", folder, token=Secret(SENTINEL, "HF_TOKEN"), private=False)
    assert public.private is False and hub.calls()[-2]["private"] is False


@pytest.mark.parametrize("mode,error_type,advice", [
    ("network", HubNetworkError, "internet connection"),
    ("rejected", HubRejectedError, "repo_id"),
    ("auth", HubAuthError, "write access"),
])
def test_stand_in_failures_leave_the_folder_alone(tmp_path: Path, folder: Path, mode: str, error_type: type,
                                                  advice: str):
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    hub = LocalHub(tmp_path / "hub", fail=mode)
    with pytest.raises(error_type) as caught:
        push_folder(hub, "user/model", folder, token=Secret(SENTINEL, "HF_TOKEN"))
    assert advice in what_to_do(caught.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not hub.repo_path("user/model").joinpath("README.md").exists()


class _LeakyHub:
    """A hub whose errors quote the token back (as a careless server or proxy might)."""

    name = "leaky hub"

    def create_repo(self, repo_id: str, *, token: Secret, private: bool) -> str:
        raise HubRejectedError(f"bad request with header 'Authorization: Bearer {token.reveal()}'")

    def upload_folder(self, repo_id: str, folder: Path, *, token: Secret, commit_message: str) -> str:
        raise AssertionError("not reached")


def test_push_folder_scrubs_the_token_from_errors(folder: Path):
    with pytest.raises(HubRejectedError) as caught:
        push_folder(_LeakyHub(), "user/model", folder, token=Secret(SENTINEL, "HF_TOKEN"))
    assert SENTINEL not in str(caught.value) and "Bearer ***" in str(caught.value)
    assert caught.value.__context__ is None  # the unscrubbed original is not attached either


def test_real_hub_unreachable_is_a_network_error_without_the_token(folder: Path):
    # Port 9 on the loopback address refuses connections: the real client, offline.
    hub = HuggingFaceHub(endpoint="http://127.0.0.1:9")
    with pytest.raises(HubNetworkError, match="could not be reached") as caught:
        push_folder(hub, "user/model", folder, token=Secret(SENTINEL, "HF_TOKEN"))
    assert SENTINEL not in str(caught.value)
    assert caught.value.__context__ is None  # the original exception (and its traceback) is dropped

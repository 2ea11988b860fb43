"""Hugging Face Hub access behind a small interface, and the rules for the token.

The token comes from the environment (``HF_TOKEN``) or from Colab's secrets, never from a parameter. It is
wrapped in :class:`Secret`, whose ``repr`` and ``str`` hide it, so printing a variable in a notebook cannot leak
it, and every error message that passes through :func:`push_folder` has it scrubbed out.

Two implementations of :class:`Hub`:

* :class:`HuggingFaceHub`: the real Hub, over ``huggingface_hub.HfApi`` (create a repo, upload a folder).
* :class:`LocalHub`: an offline stand-in that copies "uploads" into a local folder and records every call
  (without the token). Tests and dry runs select it with ``VINAKIT_HUB=local:<folder>``; it can be told to fail
  like the real Hub does (``VINAKIT_HUB_FAIL=network``, ``rejected`` or ``auth``), or drop the connection after
  half of a folder's files (``halfway``), so failure handling is tested offline.

Importing this module is cheap: ``huggingface_hub`` is imported only when the real Hub is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

from vinakit.errors import VinakitError

TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACEHUB_API_TOKEN")
COLAB_SECRET_NAME = "HF_TOKEN"
HUB_ENV_VAR = "VINAKIT_HUB"
HUB_FAIL_ENV_VAR = "VINAKIT_HUB_FAIL"
LOCAL_PREFIX = "local:"
CALLS_FILE = "calls.jsonl"
FAILURE_MODES = ("network", "rejected", "auth", "halfway")

_MIN_SECRET_LENGTH = 8  # shorter values are too likely to occur in text by chance to scrub safely


class HubError(VinakitError):
    """An upload to the Hub failed; local files are never touched by a failed upload."""


class HubAuthError(HubError):
    """No token was found, or the Hub refused it."""


class HubNetworkError(HubError):
    """The Hub could not be reached."""


class HubRejectedError(HubError):
    """The Hub refused the request (bad repo name, repo owned by someone else, quota ...)."""


class Secret:
    """A token that does not show itself: ``repr``/``str`` print ``***`` and it cannot be pickled.

    Args:
        value: the token.
        source: where it came from (an environment variable name or "Colab secret"), safe to print.
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        """The token itself, for the one call that needs it."""
        return self._value

    def scrub(self, text: str) -> str:
        """``text`` with every occurrence of the token replaced by ``***``."""
        if len(self._value) < _MIN_SECRET_LENGTH:
            return text
        return text.replace(self._value, "***")

    def __repr__(self) -> str:
        return f"Secret(*** from {self.source})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("A Secret cannot be pickled or copied into a file.")


def find_token(environ: Mapping[str, str] | None = None) -> Secret | None:
    """The Hugging Face token from ``HF_TOKEN`` (or ``HUGGING_FACE_HUB_TOKEN``), else from Colab's secrets.

    Args:
        environ: the environment to read (defaults to ``os.environ``).

    Returns:
        The token wrapped in a :class:`Secret`, or None when there is none.
    """
    environ = os.environ if environ is None else environ
    for name in TOKEN_ENV_VARS:
        value = (environ.get(name) or "").strip()
        if value:
            return Secret(value, name)
    value = _colab_secret(COLAB_SECRET_NAME)
    return Secret(value, "Colab secret") if value else None


def _colab_secret(name: str) -> str | None:
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        return None  # not on Colab
    try:
        return (userdata.get(name) or "").strip() or None
    except Exception:  # noqa: BLE001 - Colab raises its own types when the secret is missing or not shared
        return None


def known_secrets() -> list[str]:
    """Token values present in this process (environment), to refuse writing them anywhere."""
    values = [(os.environ.get(name) or "").strip() for name in TOKEN_ENV_VARS]
    return [value for value in values if len(value) >= _MIN_SECRET_LENGTH]


def assert_no_secret(text: str, where: str, token: Secret | None = None) -> None:
    """Raise if ``text`` contains a token value (defence in depth before writing a file).

    Args:
        text: what is about to be written.
        where: the file, for the message (never the token).
        token: a token to check besides those in the environment.

    Raises:
        HubError: the text contains a token.
    """
    secrets = known_secrets() + ([token.reveal()] if token and len(token.reveal()) >= _MIN_SECRET_LENGTH else [])
    if any(secret in text for secret in secrets):
        raise HubError(f"Refusing to write {where}: it would contain your Hugging Face token.")


# --------------------------------------------------------------------------------------------------------------
# The interface and its two implementations
# --------------------------------------------------------------------------------------------------------------


class Hub(Protocol):
    """What vinakit needs from a model hub."""

    name: str

    def create_repo(self, repo_id: str, *, token: Secret, private: bool) -> str:
        """Create the model repo if it does not exist; return its URL."""
        ...

    def upload_folder(self, repo_id: str, folder: Path, *, token: Secret, commit_message: str) -> str:
        """Upload every file of ``folder`` to the repo root; return the URL of the commit."""
        ...


class HuggingFaceHub:
    """The real Hugging Face Hub (``huggingface_hub.HfApi``); errors become :class:`HubError` subclasses."""

    name = "Hugging Face Hub"

    def __init__(self, endpoint: str | None = None) -> None:
        self.endpoint = endpoint

    def _api(self) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint)

    def create_repo(self, repo_id: str, *, token: Secret, private: bool) -> str:
        with _translated_errors():
            url = self._api().create_repo(repo_id, token=token.reveal(), private=private, repo_type="model",
                                          exist_ok=True)
        return str(url)

    def upload_folder(self, repo_id: str, folder: Path, *, token: Secret, commit_message: str) -> str:
        with _translated_errors():
            info = self._api().upload_folder(repo_id=repo_id, folder_path=str(folder), token=token.reveal(),
                                             repo_type="model", commit_message=commit_message)
        return str(getattr(info, "commit_url", info))


@contextlib.contextmanager
def _translated_errors() -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into HubError subclasses.

    The original exception is dropped from the chain (``from None``): its traceback could show the token.
    """
    try:
        yield
        return
    except HubError:
        raise
    except Exception as error:  # noqa: BLE001 - every failure of the upload is reported the same way
        failure = _classify(error)
    raise failure  # outside the except block: no __context__ pointing at the original


def _classify(error: BaseException) -> HubError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    name = type(error).__name__
    if status in (401, 403) or name in ("LocalTokenNotFoundError",):
        return HubAuthError(f"the Hub refused the token (HTTP {status}): {error}")
    if status is not None:
        return HubRejectedError(f"the Hub rejected the request (HTTP {status}): {error}")
    if name == "OfflineModeIsEnabled" or isinstance(error, (ConnectionError, TimeoutError, OSError)) or \
            "connect" in name.lower() or "timeout" in name.lower() or "transport" in name.lower():
        return HubNetworkError(f"the Hub could not be reached ({name}: {error})")
    return HubRejectedError(f"{name}: {error}")


class LocalHub:
    """Offline stand-in for the Hub: "uploads" are copied under ``root/<owner>/<name>/`` and calls recorded.

    Each call is appended to ``root/calls.jsonl`` as JSON with the arguments that matter and whether a token was
    given, never the token itself.

    Args:
        root: the folder that plays the Hub.
        fail: None, or make every call fail like the real Hub: "network" (unreachable), "rejected" (refused
            request) or "auth" (refused token); or "halfway": every upload stops with a network error after
            half of its files.
    """

    name = "local stand-in"

    def __init__(self, root: str | os.PathLike[str], fail: str | None = None) -> None:
        if fail and fail not in FAILURE_MODES:
            raise ValueError(f"fail must be one of {FAILURE_MODES} or None, got {fail!r}")
        self.root = Path(root)
        self.fail = fail or None

    @property
    def calls_path(self) -> Path:
        return self.root / CALLS_FILE

    def calls(self) -> list[dict[str, Any]]:
        """The recorded calls, oldest first."""
        if not self.calls_path.exists():
            return []
        return [json.loads(line) for line in self.calls_path.read_text(encoding="utf-8").splitlines() if line]

    def repo_path(self, repo_id: str) -> Path:
        """Where the stand-in keeps the files of ``repo_id``."""
        return self.root / repo_id

    def create_repo(self, repo_id: str, *, token: Secret, private: bool) -> str:
        self._record("create_repo", repo_id=repo_id, private=private, token_given=bool(token.reveal()))
        self._maybe_fail()
        self.repo_path(repo_id).mkdir(parents=True, exist_ok=True)
        return self.repo_path(repo_id).resolve().as_uri()

    def upload_folder(self, repo_id: str, folder: Path, *, token: Secret, commit_message: str) -> str:
        files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
        self._record("upload_folder", repo_id=repo_id, folder=str(folder), files=files,
                     commit_message=commit_message, token_given=bool(token.reveal()))
        self._maybe_fail()
        if self.fail == "halfway":
            for name in files[:len(files) // 2]:
                target = self.repo_path(repo_id) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(folder) / name, target)
            raise HubNetworkError(f"the connection dropped after {len(files) // 2} of {len(files)} files "
                                  f"(simulated)")
        shutil.copytree(folder, self.repo_path(repo_id), dirs_exist_ok=True)
        return self.repo_path(repo_id).resolve().as_uri()

    def _record(self, call: str, **fields: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.calls_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"call": call, **fields}, ensure_ascii=False) + "\n")

    def _maybe_fail(self) -> None:
        if self.fail == "network":
            raise HubNetworkError("the Hub could not be reached (simulated: no network)")
        if self.fail == "rejected":
            raise HubRejectedError("the Hub rejected the request (simulated: HTTP 409 repo owned by someone else)")
        if self.fail == "auth":
            raise HubAuthError("the Hub refused the token (simulated: HTTP 403, token without write access)")


def default_hub(environ: Mapping[str, str] | None = None) -> Hub:
    """The Hub the kit talks to: the real one, or the local stand-in when ``VINAKIT_HUB=local:<folder>``.

    Args:
        environ: the environment to read (defaults to ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    choice = environ.get(HUB_ENV_VAR, "").strip()
    if choice.startswith(LOCAL_PREFIX):
        return LocalHub(choice[len(LOCAL_PREFIX):], fail=environ.get(HUB_FAIL_ENV_VAR, "").strip() or None)
    if choice:
        raise HubError(f"{HUB_ENV_VAR}={choice!r} is not understood: leave it unset for the Hugging Face Hub, "
                           f"or set it to '{LOCAL_PREFIX}<folder>' for the offline stand-in.")
    return HuggingFaceHub()


# --------------------------------------------------------------------------------------------------------------
# Pushing one folder
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushedRepo:
    """One folder uploaded to one repo."""

    repo_id: str
    url: str
    commit_url: str
    private: bool
    folder: str

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "url": self.url, "commit_url": self.commit_url, "private": self.private,
                "folder": self.folder}


def push_folder(hub: Hub, repo_id: str, folder: str | os.PathLike[str], *, token: Secret, private: bool = True,
                commit_message: str = "Upload with vinakit") -> PushedRepo:
    """Create ``repo_id`` (private by default) and upload ``folder`` to it.

    Args:
        hub: the Hub (see :func:`default_hub`).
        repo_id: ``owner/name``.
        folder: a local folder; it is only read.
        token: the token from :func:`find_token`.
        private: create the repo private (an existing repo keeps its visibility).
        commit_message: the commit message on the Hub.

    Returns:
        Where the folder went.

    Raises:
        HubError: a subclass saying what failed; the message never contains the token.
    """
    folder = Path(folder)
    try:
        url = hub.create_repo(repo_id, token=token, private=private)
        commit_url = hub.upload_folder(repo_id, folder, token=token, commit_message=commit_message)
    except HubError as error:
        failure = type(error)(token.scrub(str(error)))
    else:
        return PushedRepo(repo_id=repo_id, url=url, commit_url=commit_url, private=private, folder=str(folder))
    raise failure  # outside the except block, so the unscrubbed original is not attached as __context__


def what_to_do(error: HubError) -> str:
    """One sentence telling the user how to fix a failed upload."""
    if isinstance(error, HubAuthError):
        return ("Create a token with write access at https://huggingface.co/settings/tokens and set it as the "
                "environment variable HF_TOKEN (in Colab: the key icon > add secret HF_TOKEN, notebook access on).")
    if isinstance(error, HubNetworkError):
        return "Check the internet connection (and that HF_HUB_OFFLINE is not set), then retry the upload."
    return ("Check repo_id (owner/name, an owner your token may write to, a name not taken by another repo type), "
            "then retry the upload.")

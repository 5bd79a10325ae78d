"""Pushing compressed models to the Hugging Face Hub, with their card, plots and compression report.

Two ways in:

* ``push_compressed_model(folder, repo_id)`` uploads a saved folder (``save_pretrained`` or
  ``Trainer.save_model`` output plus what ``write_model_card`` added) in one commit.
* With ``Trainer(args=TrainingArguments(push_to_hub=True, ...))``, attach a ``CompreSSMHubCallback``:

  .. code-block:: python

      trainer = Trainer(model=model, args=args, callbacks=[compressm_callback], ...)
      CompreSSMHubCallback.attach(trainer, dataset_names=["wikitext"])
      trainer.train()
      trainer.push_to_hub()          # or trainer.save_model(), which pushes when push_to_hub=True

  How transformers 5.23 pushes, and what the callback does about it:

  - ``Trainer.__init__`` creates the repository (``init_hf_repo``) when ``push_to_hub=True``.
  - ``hub_strategy="every_save"`` / ``"checkpoint"`` / ``"all_checkpoints"``: at every save,
    ``_push_from_checkpoint`` copies the weights into ``output_dir`` and uploads ``output_dir`` (without
    ``checkpoint-*`` and ``_*``). It fires ``on_push_begin`` first: the callback writes
    ``compression_report.json``, the plots and the card into ``output_dir`` there.
  - ``hub_strategy="end"``: nothing is pushed during training; ``trainer.push_to_hub()`` (also called by
    ``trainer.save_model()`` when ``push_to_hub=True``) fires ``on_push_begin``, saves the model, then
    **overwrites** ``output_dir/README.md`` with its own ``create_model_card`` before ``upload_folder``.
    ``attach``/``bind`` wraps ``trainer.create_model_card`` so that the CompreSSM card is written after the
    Trainer's draft, keeping the draft's hyperparameters, results and framework versions in a section.

Errors from the Hub are re-raised as :class:`CompreSSMHubError` with a message that says what to do (network
or ``HF_ENDPOINT``, token, server error). A push never writes into the folder it uploads. For the Trainer's own
push, wrap it the same way: ``with hub_errors(args.hub_model_id): trainer.push_to_hub()``.

No secret leaves the machine:

* ``Trainer`` pickles its ``TrainingArguments`` into ``training_args.bin`` (``output_dir`` and every
  ``checkpoint-N``), ``hub_token`` included. :func:`protect_hub_token` moves the token into the process
  environment (``HF_TOKEN``, where ``huggingface_hub`` looks when a call gets no token) and sets
  ``args.hub_token = None``, so the pickles never hold it while every push still authenticates.
  ``CompreSSMHubCallback.attach``/``bind`` and ``CompreSSMCallback`` (at ``on_init_end``) call it, and so
  does ``compressm-train``: with either callback, ``TrainingArguments(hub_token=...)`` is safe. The token then
  also serves other Hub calls of this process (and of the subprocesses it starts).
* :func:`push_compressed_model` never uploads ``training_args.bin`` (it holds local paths, and written by an
  unprotected Trainer, the token; reading it back means unpickling it, which can run code) and refuses to
  upload any file whose bytes contain the token in use or the folder's absolute path.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model_card import REPORT_NAME, load_report, write_model_card

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo

try:  # the callback is optional: this module also works where only huggingface_hub is installed
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[assignment,misc]

__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "CompreSSMHubCallback",
    "CompreSSMHubError",
    "hub_errors",
    "metrics_from_log_history",
    "protect_hub_token",
    "push_compressed_model",
    "trainer_summary",
]

logger = logging.getLogger(__name__)

# Trainer checkpoints (optimizer state, RNG state), temporary files and the pickled TrainingArguments (local
# paths, possibly a token; see the module docstring) never go to the Hub.
DEFAULT_IGNORE_PATTERNS = [
    "checkpoint-*",
    "*.tmp",
    ".compression_report.*",
    "training_args.bin",
    "*/training_args.bin",
]
# Shorter "tokens" (placeholders) would match by chance; real Hub tokens are ~37 characters.
_MIN_SECRET_LENGTH = 8

_NETWORK_ERROR_NAMES = {
    "ConnectError",
    "ConnectTimeout",
    "NetworkError",
    "TransportError",
    "TimeoutException",
    "ReadTimeout",
    "ProxyError",
    "RemoteProtocolError",
}


class CompreSSMHubError(OSError):
    """A Hub operation failed; the message says why and what to try. The local folder was not modified.

    Attributes: ``endpoint``, ``repo_id``, ``status_code`` (``None`` when no HTTP answer came back).
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        repo_id: str | None = None,
        status_code: int | None = None,
    ):
        super().__init__(message)
        self.endpoint = endpoint
        self.repo_id = repo_id
        self.status_code = status_code


def _current_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_network_error(err: BaseException) -> bool:
    for exc in _causes(err):
        if isinstance(exc, (ConnectionError, socket.gaierror, TimeoutError)):
            return True
        if any(cls.__name__ in _NETWORK_ERROR_NAMES for cls in type(exc).__mro__):
            return True
    return False


def _translate(err: BaseException, *, endpoint: str, repo_id: str, action: str) -> CompreSSMHubError | None:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    where = f"{action} '{repo_id}' on {endpoint}"
    if isinstance(err, OfflineModeIsEnabled):
        return CompreSSMHubError(
            f"Cannot push: {where} needs the network, but offline mode is on (HF_HUB_OFFLINE=1 or "
            "TRANSFORMERS_OFFLINE=1). Unset it to push; the model folder is unchanged.",
            endpoint=endpoint,
            repo_id=repo_id,
        )
    if isinstance(err, HfHubHTTPError) and getattr(err, "response", None) is not None:
        status = err.response.status_code
        server_message = getattr(err, "server_message", None) or ""
        server_message = server_message.strip()
        if server_message and server_message[-1] not in ".!?":
            server_message += "."
        detail = f" The Hub said: {server_message}" if server_message else ""
        if status in (401, 403):
            return CompreSSMHubError(
                f"{where} was refused with HTTP {status}: the token is missing, invalid or has no write access "
                f"to '{repo_id}'. Log in with `hf auth login` (or set HF_TOKEN / pass token=...) using a token with "
                f"write permission for that namespace.{detail} The model folder is unchanged.",
                endpoint=endpoint,
                repo_id=repo_id,
                status_code=status,
            )
        if status >= 500:
            return CompreSSMHubError(
                f"{where} failed with a server error (HTTP {status}).{detail} The model folder was not changed, "
                "and a commit that fails this way is normally not applied on the Hub. Pushing again is safe: "
                "files that are already on the Hub unchanged are skipped.",
                endpoint=endpoint,
                repo_id=repo_id,
                status_code=status,
            )
        return CompreSSMHubError(
            f"{where} failed with HTTP {status}.{detail} The model folder is unchanged.",
            endpoint=endpoint,
            repo_id=repo_id,
            status_code=status,
        )
    if _is_network_error(err):
        return CompreSSMHubError(
            f"Could not reach the Hub at {endpoint} while {where.split(' on ')[0]}: {err}. Check the network "
            "connection and the HF_ENDPOINT environment variable (it is read when huggingface_hub is imported; "
            f"now {endpoint!r}). Without network access, keep the saved folder and push it later, or set "
            "HF_HUB_OFFLINE=1 to skip Hub calls. The model folder is unchanged.",
            endpoint=endpoint,
            repo_id=repo_id,
        )
    if isinstance(err, ValueError) and "metadata" in str(err).lower():
        return CompreSSMHubError(
            f"{where} was rejected because of the README.md metadata: {err}",
            endpoint=endpoint,
            repo_id=repo_id,
        )
    return None


@contextmanager
def hub_errors(repo_id: str, *, endpoint: str | None = None, action: str = "pushing to") -> Iterator[None]:
    """Re-raise Hub failures (network, auth, HTTP errors) inside the block as :class:`CompreSSMHubError`."""
    endpoint = endpoint or _current_endpoint()
    try:
        yield
    except CompreSSMHubError:
        raise
    except Exception as err:
        translated = _translate(err, endpoint=endpoint, repo_id=repo_id, action=action)
        if translated is None:
            raise
        raise translated from err


def protect_hub_token(args) -> str | None:
    """Move ``args.hub_token`` into the ``HF_TOKEN`` environment variable and clear it from ``args``.

    ``Trainer`` pickles ``args`` into every ``training_args.bin`` it writes (and uploads that file from
    ``output_dir``); after this call the pickles hold no token, while ``huggingface_hub`` still finds it for
    every push (a call without a token reads ``HF_TOKEN``, which wins over a stored login). Call it after
    ``Trainer(...)`` was built (the repository is created in ``__init__`` with ``args.hub_token``) or before,
    and before the first save. Idempotent.

    Args:
        args: a ``TrainingArguments`` (anything with a ``hub_token`` attribute).

    Returns:
        the token that was moved, or ``None`` when ``args`` held none.

    Raises:
        TypeError: ``args.hub_token`` is set but is not a string.
    """
    token = getattr(args, "hub_token", None)
    if token is None or token == "":
        return None
    if not isinstance(token, str):
        raise TypeError(
            f"hub_token must be a string (a Hub access token), got a {type(token).__name__}; pass the token "
            "text, or leave hub_token unset and log in with `hf auth login` / set HF_TOKEN"
        )
    os.environ["HF_TOKEN"] = token
    args.hub_token = None
    logger.info("hub_token moved from the TrainingArguments to HF_TOKEN, so that no saved file contains it")
    return token


def _upload_candidates(folder: Path, patterns: list[str]) -> list[Path]:
    """The files of ``folder`` that an ``upload_folder`` with ``ignore_patterns=patterns`` would send."""
    from huggingface_hub.utils import filter_repo_objects

    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    # upload_folder itself always leaves out git metadata and its own upload cache
    patterns = [*patterns, ".git/*", "*/.git/*", ".cache/huggingface/*"]
    return [files[rel] for rel in filter_repo_objects(sorted(files), ignore_patterns=patterns)]


def _file_contains(path: Path, needles: list[bytes]) -> bytes | None:
    """The first of ``needles`` found in the raw bytes of ``path`` (memory-mapped: weights are not read in)."""
    import mmap

    if path.stat().st_size == 0:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for needle in needles:
            if data.find(needle) != -1:
                return needle
    return None


def _check_no_secrets(folder: Path, files: list[Path], token: str | bool | None) -> None:
    """Refuse to upload a file that holds the Hub token in use or the folder's absolute local path."""
    from huggingface_hub import get_token

    tokens = {token if isinstance(token, str) else None, get_token() if token is not False else None}
    secrets = {t.encode(): "the Hub token" for t in tokens if t and len(t) >= _MIN_SECRET_LENGTH}
    for local in {str(folder.absolute()), str(folder.resolve())}:
        if len(local) >= _MIN_SECRET_LENGTH:
            secrets[local.encode()] = f"the local path {local!r}"
    for path in files:
        found = _file_contains(path, list(secrets))
        if found is not None:
            raise ValueError(
                f"Refusing to push {str(folder)!r}: {path.relative_to(folder).as_posix()} contains "
                f"{secrets[found]}, which must not leave this machine. Remove it from the file (or the file "
                "from the folder), or leave the file out with ignore_patterns=[...]. Nothing was uploaded."
            )


def push_compressed_model(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = False,
    commit_message: str = "Upload CompreSSM-compressed model",
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    ignore_patterns: Iterable[str] | None = None,
) -> CommitInfo:
    """Upload a saved model folder (weights, config, modeling code, card, plots, report) to ``repo_id``.

    Creates the repository if needed (``exist_ok``), then uploads the whole folder in one commit, leaving out
    ``DEFAULT_IGNORE_PATTERNS`` (Trainer ``checkpoint-*`` folders, temporary files, ``training_args.bin``) and
    ``ignore_patterns``. Before anything is sent, every file to upload is scanned (raw bytes) for the token in
    use (``token`` or the one ``huggingface_hub`` would use) and for the folder's absolute path; a hit stops
    the push. Write the card first with :func:`~compressm_hf.trainer.model_card.write_model_card`; this
    function only reads the folder.

    Args:
        folder: the saved model folder.
        repo_id: ``"namespace/name"``.
        token: a token with write access; default: the saved login or ``HF_TOKEN``.
        private: visibility of a new repository (ignored if it exists).
        endpoint: the Hub URL; default ``huggingface_hub.constants.ENDPOINT`` (``HF_ENDPOINT``).

    Returns:
        the ``CommitInfo`` of the upload.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: a file to upload contains the token or the folder's absolute path (nothing is uploaded).
        CompreSSMHubError: the Hub could not be reached, refused the token, or failed; the folder is unchanged.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Cannot push {str(folder)!r}: it is not a folder (save the model there first)."
        )
    if not (folder / "README.md").is_file():
        logger.warning(
            "%s has no README.md; the Hub page will be empty. Call write_model_card(%r, ...) before pushing.",
            folder,
            str(folder),
        )
    api = HfApi(endpoint=endpoint)
    patterns = [*DEFAULT_IGNORE_PATTERNS, *(ignore_patterns or [])]
    _check_no_secrets(folder, _upload_candidates(folder, patterns), token)
    with hub_errors(repo_id, endpoint=api.endpoint, action="creating the repository"):
        repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    with hub_errors(repo_id, endpoint=api.endpoint, action="uploading the model folder to"):
        commit = api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=folder,
            commit_message=commit_message,
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
            ignore_patterns=patterns,
        )
    logger.info("Pushed %s to %s", folder, commit.commit_url)
    return commit


def metrics_from_log_history(log_history: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The last value of each evaluation metric and the final training loss from ``TrainerState.log_history``."""
    metrics: dict[str, Any] = {}
    for entry in log_history:
        for key, value in entry.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")):
                metrics[key] = value
            elif key in ("loss", "train_loss"):
                metrics["train_loss" if key == "train_loss" else "loss (last logged)"] = value
            elif key == "epoch":
                metrics["epoch"] = value
    return metrics


_TRAINER_SECTIONS = ("Training hyperparameters", "Training results", "Framework versions")


def trainer_summary(draft: str) -> str | None:
    """The useful part of ``Trainer.create_model_card``'s draft: hyperparameters, results, framework versions.

    The draft's other sections ("More information needed", "fine-tuned version of ... on an unknown dataset")
    are left out; each kept section becomes a level-3 heading with its body, empty sections are dropped.
    """
    sections: list[tuple[str, list[str]]] = []
    title, body = None, []
    for line in draft.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not line.startswith("    "):
            if title is not None:
                sections.append((title, body))
            title, body = stripped.lstrip("#").strip(), []
        elif title is not None:
            body.append(line)
    if title is not None:
        sections.append((title, body))
    kept = [
        f"### {title}\n\n" + "\n".join(body).strip()
        for title, body in sections
        if title in _TRAINER_SECTIONS and "\n".join(body).strip()
    ]
    return "\n\n".join(kept) if kept else None


class CompreSSMHubCallback(TrainerCallback):
    """Keeps ``compression_report.json``, the plots and the CompreSSM card in ``output_dir`` for Trainer pushes.

    Use :meth:`attach` (adds the callback and binds it) so that ``trainer.push_to_hub()`` keeps this card
    instead of the Trainer's generic one. Card options (``dataset_names``, ``base_model``, ``license``,
    ``metrics``, ...) are passed on to :func:`write_model_card`; without ``metrics``, they are taken from the
    Trainer's log history.
    """

    def __init__(self, **card_kwargs: Any):
        self.card_kwargs = card_kwargs
        self._trainer = None

    @classmethod
    def attach(cls, trainer, **card_kwargs: Any) -> CompreSSMHubCallback:
        callback = cls(**card_kwargs)
        trainer.add_callback(callback)
        return callback.bind(trainer)

    def bind(self, trainer) -> CompreSSMHubCallback:
        """Make ``trainer.create_model_card`` (called by ``Trainer.push_to_hub``) write the CompreSSM card.

        Also moves ``trainer.args.hub_token`` into ``HF_TOKEN`` (:func:`protect_hub_token`), so that no
        ``training_args.bin`` the Trainer writes or pushes holds the token.
        """
        if self._trainer is trainer:
            return self
        self._trainer = trainer
        protect_hub_token(trainer.args)  # before the first save pickles the args
        trainer_create_model_card = trainer.create_model_card

        def create_model_card(*args: Any, **kwargs: Any) -> None:
            trainer_create_model_card(*args, **kwargs)
            if not trainer.is_world_process_zero():
                return
            readme = Path(trainer.args.output_dir) / "README.md"
            summary, tags = None, None
            if readme.is_file():
                from huggingface_hub import ModelCard

                draft = ModelCard.load(readme)
                summary = trainer_summary(draft.text)
                tags = [t for t in (draft.data.tags or []) if isinstance(t, str)]
            self.write(
                trainer.args.output_dir,
                trainer.state,
                model=trainer.model,
                training_summary=summary,
                extra_tags=tags,
                model_name=kwargs.get("model_name"),
            )

        trainer.create_model_card = create_model_card
        return self

    def write(
        self,
        output_dir: str | os.PathLike,
        state=None,
        *,
        model=None,
        training_summary: str | None = None,
        extra_tags: list[str] | None = None,
        model_name: str | None = None,
    ):
        """Write the report (if one is found), plots and card into ``output_dir``; returns the card."""
        kwargs = dict(self.card_kwargs)
        folder = Path(output_dir)
        report = kwargs.pop("report", None)
        if report is None:
            report = self._find_report(folder, model)
        if kwargs.get("metrics") is None and state is not None:
            kwargs["metrics"] = metrics_from_log_history(state.log_history) or None
        if kwargs.get("max_steps") is None and state is not None and getattr(state, "max_steps", 0):
            kwargs["max_steps"] = state.max_steps
        if kwargs.get("repo_id") is None and self._trainer is not None:
            kwargs["repo_id"] = (
                getattr(self._trainer, "hub_model_id", None) or self._trainer.args.hub_model_id
            )
        if training_summary is not None and kwargs.get("training_summary") is None:
            kwargs["training_summary"] = training_summary
        if extra_tags:
            kwargs["tags"] = [*(kwargs.get("tags") or []), *extra_tags]
        if model_name and kwargs.get("model_name") is None:
            kwargs["model_name"] = model_name
        if kwargs.get("config") is None and model is not None and not (folder / "config.json").is_file():
            config = getattr(model, "config", None)
            if config is not None and hasattr(config, "to_dict"):
                kwargs["config"] = config.to_dict()
        return write_model_card(folder, report=report, **kwargs)

    @staticmethod
    def _find_report(folder: Path, model=None) -> dict | None:
        if (folder / REPORT_NAME).is_file():
            return load_report(folder / REPORT_NAME)
        checkpoints = sorted(
            (p for p in folder.glob("checkpoint-*") if (p / REPORT_NAME).is_file()),
            key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1,
        )
        if checkpoints:
            return load_report(checkpoints[-1] / REPORT_NAME)
        return None

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self.write(args.output_dir, state, model=model)

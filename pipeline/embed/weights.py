"""Where a backbone's weights come from: random, a local checkpoint file, or an open_clip pretrained tag.

open_clip downloads a tag's weights from the Hugging Face hub with several retries, which takes close
to a minute to fail on a machine without network. This module resolves a tag to a local file first
(the hub cache, open_clip's URL cache), probes the hub with a short timeout only when the file is not
cached, and fails in seconds with a sentence that names the way out (a local file or `none`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip

from rankpipe.errors import InputError

logger = logging.getLogger(__name__)

# `--pretrained none`: random weights from a seeded initialisation.
RANDOM_WEIGHTS = "none"
# The provenance value of `pretrained` for weights loaded from a user's checkpoint file.
FILE_WEIGHTS = "file"
# Seconds to wait for a TCP connection to the weights host before calling the machine offline.
PROBE_TIMEOUT_S = 3.0


@dataclasses.dataclass(frozen=True)
class ResolvedWeights:
    """A pretrained argument turned into something open_clip can load without a network."""

    # "none" (random weights), "file" (a local checkpoint) or the open_clip tag that was asked for.
    pretrained: str
    # Local checkpoint file to load; None for random weights.
    path: Path | None
    # SHA-256 of a user-given checkpoint file (None for tags and random weights).
    checkpoint_sha256: str | None
    # The tag's open_clip config (mean, std, interpolation, resize_mode, quick_gelu); {} otherwise.
    tag_cfg: dict[str, Any]


def check_model_name(model: str) -> None:
    """Raise InputError naming close matches when `model` is not an open_clip architecture."""
    known = open_clip.list_models()
    if model in known:
        return
    close = difflib.get_close_matches(model, known, n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else "see open_clip.list_models() for the names"
    raise InputError(f"unknown model {model!r}; {hint}")


def resolve_weights(model: str, pretrained: str) -> ResolvedWeights:
    """Turn `--pretrained` into a local file (or none), failing fast when a download is impossible.

    Args:
        model: open_clip model name (already checked with `check_model_name`).
        pretrained: "none", a path to a checkpoint file, or an open_clip pretrained tag.

    Returns:
        The weights to load; `path` is a local file or None.

    Raises:
        InputError: unknown tag, missing file, or weights that cannot be downloaded.
    """
    if pretrained.lower() == RANDOM_WEIGHTS:
        return ResolvedWeights(RANDOM_WEIGHTS, None, None, {})
    if os.path.isfile(pretrained):
        path = Path(pretrained)
        return ResolvedWeights(FILE_WEIGHTS, path, file_sha256(path), {})
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        if _looks_like_path(pretrained):
            raise InputError(f"checkpoint file {pretrained} does not exist; pass an existing file, a pretrained tag, or none")
        tags = open_clip.list_pretrained_tags_by_model(model)
        known = f"known tags for {model}: {', '.join(tags)}" if tags else f"{model} has no pretrained tags"
        raise InputError(f"unknown pretrained weights {pretrained!r} for model {model}; {known}; or pass a checkpoint file or none")
    path = _cached_tag_file(tag_cfg) or _download_tag(model, pretrained, tag_cfg)
    return ResolvedWeights(pretrained, path, None, dict(tag_cfg))


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _cached_tag_file(tag_cfg: dict[str, Any]) -> Path | None:
    """The tag's weights if already on disk (no network used)."""
    if "file" in tag_cfg:
        return Path(tag_cfg["file"])
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = _split_hf_hub(tag_cfg["hf_hub"])
        for candidate in _hf_candidates(filename):
            found = try_to_load_from_cache(repo_id, candidate)
            if isinstance(found, str):
                return Path(found)
    if tag_cfg.get("url"):
        # open_clip's own cache for URL downloads.
        target = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        if target.is_file():
            return target
    return None


def _split_hf_hub(hf_hub: str) -> tuple[str, str]:
    # open_clip writes 'org/repo/filename' or 'org/repo/' (default weights file name).
    repo_id, filename = os.path.split(hf_hub)
    return repo_id, filename or "open_clip_pytorch_model.bin"


def _hf_candidates(filename: str) -> list[str]:
    # open_clip prefers a safetensors sibling of a .bin/.pth file when the repo has one.
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _download_tag(model: str, tag: str, tag_cfg: dict[str, Any]) -> Path:
    host = _weights_host(tag_cfg)
    offline = InputError(
        f"could not download pretrained weights {tag!r} for model {model} (no network?); pass a local "
        f"checkpoint file with --pretrained /path/to/weights, or --pretrained none for random weights"
    )
    if not _reachable(host):
        raise offline
    logger.info("downloading pretrained weights %r for %s from %s", tag, model, host)
    try:
        return Path(open_clip.download_pretrained(tag_cfg))
    except Exception as e:  # the hub client raises many types for one cause: the file could not be fetched
        raise offline from e


def _weights_host(tag_cfg: dict[str, Any]) -> str:
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    return urlparse(tag_cfg.get("url", "")).hostname or ""


def _reachable(host: str) -> bool:
    """Whether a TCP connection to host:443 opens within PROBE_TIMEOUT_S (DNS included)."""
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
            result.append(True)
        except OSError:
            result.append(False)

    # Name resolution ignores socket timeouts, so the probe runs in a thread we stop waiting for.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1.0)
    return bool(result and result[0])

"""Results cached on disk under what determines them (the steering evaluation's theme setup:
the seed ranking's feature statistics, the magnitudes, the topic and coherence calibrations).

A ``Memo`` stores one value per *key*: a JSON-able dict that names every input of the
computation (a fingerprint of the model or SAE, a hash of the texts, the settings, the seed)
and the version of the code that computes it. The file is ``FOLDER/KIND/HASH.pt`` (the hash
of the key), it holds the key beside the value and is used only when that key matches, so
changing any input computes the value again under a new name. Values are what
``torch.load(weights_only=True)`` reads back bit for bit: tensors, floats, ints, strings and
lists or dicts of them. Files are written atomically (``saeflow.io.save_checkpoint``); a file
that cannot be read is computed again and replaced.

Fingerprints: ``model_fingerprint`` hashes the weights and buffers' bytes, the config, the
tokenizer and what decides the arithmetic (dtype, device, torch and transformers versions,
thread count); ``sae_fingerprint`` an SAE's tensors and settings. Both are kept per object
and recomputed when a tensor is changed in place (its version counter moves).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from saeflow.io import save_checkpoint

T = TypeVar("T")
_PRINTS: dict[int, tuple[weakref.ref, tuple, str]] = {}


def digest(obj: Any) -> str:
    """A short hash of a JSON-able object (dict keys sorted)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def texts_digest(texts: Sequence[str]) -> str:
    """A hash of a sequence of texts, order and boundaries included."""
    h = hashlib.sha1(str(len(texts)).encode())
    for t in texts:
        h.update(b"\0" + t.encode("utf-8"))
    return h.hexdigest()[:24]


def _tensor_hash(h, tensors: Iterable[torch.Tensor | None]) -> None:
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def _kept(obj, tensors: list[torch.Tensor], compute: Callable[[], str]) -> str:
    """``compute()`` once per object while none of ``tensors`` is replaced or edited."""
    state = tuple((t.data_ptr(), t._version) for t in tensors)
    got = _PRINTS.get(id(obj))
    if got is not None and got[0]() is obj and got[1] == state:
        return got[2]
    fp = compute()
    _PRINTS[id(obj)] = (weakref.ref(obj, lambda _, k=id(obj): _PRINTS.pop(k, None)), state, fp)
    return fp


def _tokenizer_text(tok) -> str:
    if tok is None:
        return "none"
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    return f"{type(tok).__name__}:{sorted(vocab.items())}"


def model_fingerprint(lm) -> str:
    """What a model's outputs depend on (module docstring), as a hash."""
    import transformers
    model = lm.model
    params = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]

    def compute() -> str:
        h = hashlib.sha1()
        h.update(json.dumps([type(model).__name__, model.config.to_json_string(),
                             getattr(model.config, "_attn_implementation", None),
                             str(lm.dtype), str(lm.device), torch.__version__,
                             transformers.__version__, torch.get_num_threads()]).encode())
        h.update(_tokenizer_text(lm.tokenizer).encode())
        _tensor_hash(h, params)
        return h.hexdigest()[:24]
    return _kept(model, params, compute)


def sae_fingerprint(sae) -> str:
    """A hash of an SAE's tensors and the settings its encoder and decoder read."""
    tensors = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold]

    def compute() -> str:
        h = hashlib.sha1(json.dumps([sae.activation, sae.k, sae.apply_b_dec_to_input,
                                     sae.input_norm, sae.input_scale, sae.output_scale]).encode())
        _tensor_hash(h, tensors)
        return h.hexdigest()[:24]
    return _kept(sae, [t for t in tensors if t is not None], compute)


class Memo:
    """Values on disk under their keys (module docstring). ``hits`` and ``misses`` count this
    object's look-ups by kind."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    def path(self, kind: str, key: dict) -> Path:
        return self.folder / kind / f"{digest(key)}.pt"

    def __call__(self, kind: str, key: dict, compute: Callable[[], T]) -> T:
        """The stored value of ``key``, else ``compute()``, stored."""
        key = json.loads(json.dumps(key, sort_keys=True, default=str))  # as stored
        path = self.path(kind, key)
        if path.exists():
            try:
                stored = torch.load(path, weights_only=True)
            except Exception:  # unreadable (truncated, another format): compute it again
                stored = None
            if isinstance(stored, dict) and stored.get("key") == key:
                self.hits[kind] = self.hits.get(kind, 0) + 1
                return stored["value"]
        value = compute()
        save_checkpoint(path, {"key": key, "value": value})
        self.misses[kind] = self.misses.get(kind, 0) + 1
        return value


def setup_memo() -> Memo:
    """Where the theme setups' deterministic parts are kept (per-text feature statistics,
    magnitudes, scorer calibrations): the cache directory's ``theme-setup`` folder. Every
    command that ranks a theme's features reads and fills it (``steer-eval``, ``steer
    --theme``, ``themes``, the viewer's theme search)."""
    from saeflow.io import cache_dir
    return Memo(cache_dir() / "theme-setup")

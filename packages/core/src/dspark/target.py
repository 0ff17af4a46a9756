"""Target adapter: any Hugging Face causal LM (plus the embedded Gemma) behind one API.

What drafters, the verifier and the engine need from a target and nothing more:
a forward over new tokens with a KV cache, rollback of that cache by n tokens (also past a
sliding window), taps on chosen decoder layers and on the final normed hidden state, the
frozen embedding and LM head, and prompt encoding.
"""

from __future__ import annotations

import contextlib
import inspect

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dspark import embedded, packed_linear
from dspark.errors import ModelLoadError
from dspark.prompts import Message, PromptFormat
from dspark.sampling import Generators, SamplingParams, sample_from_logits

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls are native: CUDA, or a CPU with AVX512-BF16 / AMX. Elsewhere bf16
    is emulated (measured ~3x slower than fp32 on an AVX-512 Xeon without AVX512-BF16)."""
    if torch.device(device).type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name, or ``auto``: bfloat16 where it is native on ``device``, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# A verify forward's few rows against the 262k-row LM head: on CPU, fp32 GEMM with 4..48
# rows runs at a fraction of its speed for one row (measured: 8 rows 108 ms, 1 row 33 ms
# on a 2-core Xeon); streaming the weight in blocks, W_blk @ h^T, takes 67 ms for 8 rows.
# oneDNN on a prepacked copy (dspark.packed_linear) beat both at every row count from 1 to
# 32 on a 2-core AMD EPYC (8 rows: library 359, blockwise 110, oneDNN 81 ms), and the
# library at 64-512 rows (256 rows, the top-k cache's chunk: ~1.0 vs ~1.4 s), so it is
# used for every row count wherever it is available (not under autograd). Without it:
# blockwise for 4..48 rows, and for 1-3 rows the first call of each row count times
# library and blockwise once and keeps the faster (on that EPYC the library took 73 / 142 ms for 1 / 2 rows against 67 / 49 ms
# blockwise; on the Xeon the library was faster). Above that the library's own kernel.
_SKINNY_ROWS = (4, 48)
_SKINNY_BLOCK = 32768
HEAD_KERNELS = ("library", "blockwise", "packed")
_few_rows_choice: dict[tuple[int, int], str] = {}  # (rows, vocab) -> the faster of library / blockwise


def skinny_linear(hidden: torch.Tensor, weight: torch.Tensor, block: int = _SKINNY_BLOCK) -> torch.Tensor:
    """``hidden @ weight.T`` for few rows of ``hidden`` [..., d] and a tall ``weight``
    [V, d], computed blockwise over V as ``weight[blk] @ hidden.T``; same values as
    ``F.linear`` up to float summation order."""
    h = hidden.reshape(-1, hidden.shape[-1])
    V = weight.shape[0]
    out = torch.empty((V, h.shape[0]), dtype=torch.promote_types(h.dtype, weight.dtype), device=h.device)
    ht = h.t()
    for i in range(0, V, block):
        torch.mm(weight[i : i + block], ht, out=out[i : i + block])
    return out.t().contiguous().reshape(*hidden.shape[:-1], V)


@dataclass
class TargetOutput:
    """Result of one target forward.

    logits: [B, n_logits, V] fp32, for the requested positions (all, last or none).
    taps: layer index -> [B, n, d] raw output of that decoder layer (model dtype).
    final_hidden: [B, n, d] final normed hidden state (what the LM head reads), if asked.
    """

    logits: torch.Tensor | None
    taps: dict[int, torch.Tensor] = field(default_factory=dict)
    final_hidden: torch.Tensor | None = None


def _resolve_path(name_or_path: str) -> str:
    """A local directory, or an id already in the local Hugging Face cache (no downloads)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"model directory {p} has no config.json")
        return str(p)
    if p.exists():
        raise ModelLoadError(f"model path {p} is a file; give the model directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"unknown model {name_or_path!r}: not a local directory and not in the local "
            "Hugging Face cache (this project never downloads). Use 'gemma3-270m' for the "
            "embedded default or a path to a saved model."
        ) from e


class Target:
    """A frozen causal LM with a KV cache that can roll back, and feature taps.

    Works with any HF decoder-only model exposing ``model.model.layers`` (or
    ``get_decoder().layers``), ``get_input_embeddings`` and ``get_output_embeddings``:
    Gemma 3, Qwen3, Llama and relatives.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None = None,
        name: str = "custom",
        prompt_format: PromptFormat | None = None,
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.prompt_format = prompt_format or PromptFormat()
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.layers: nn.ModuleList = decoder.layers
        self.decoder = decoder
        # transformers >= 5.2x names the decoder's cache argument ``cache``; earlier
        # releases (and many remote-code models) call it ``past_key_values``
        params = inspect.signature(decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._softcap = getattr(self.config, "final_logit_softcapping", None)
        # the engine asks for these per request and per step: keep the Parameter objects
        # (Module.to() converts them in place, so their device and dtype stay current)
        self._first_param = next(self.model.parameters())
        self._lm_param = self.model.get_output_embeddings().weight
        # next tokens from an fp16 screen of the LM head (dspark.screened_head): None picks
        # it where it measures faster, True / False force it on / off
        self.screen_head: bool | None = None
        self._screen: Any = None
        self._screen_faster: dict[int, bool] = {}  # rows -> the screen beat the full head
        # the LM head's product: None picks (see _head_kernel), or one of HEAD_KERNELS forced
        self.head_kernel: str | None = None
        # fp32 CPU products through oneDNN on prepacked weights (the decoder layers' 2-64-row
        # products, the LM head at any row count), where this torch build has it and it
        # passes its probe
        self.packing = False
        self.packed_linears = 0
        self.use_packed_linears(True)
        # decoding steps (the engine's slot cache, the AR loop) through the lean decoder of
        # dspark.fast_decoder where it supports this model: None = where supported, False =
        # always HF's forward, True = require it
        self.fast_decoder: bool | None = None
        self._fast_step: Any = None  # the FastGemma3 of this target, made on first use

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        name_or_path: str = embedded.EMBEDDED_CANONICAL,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        prompt_format: PromptFormat | None = None,
        verify_cache: bool = True,
    ) -> Target:
        """Load a target by name or path.

        ``gemma3-270m`` (the default) is the embedded Gemma 3 270M, converted once from
        its GGUF into a checksummed safetensors copy in the user cache. Anything else is a
        local HF model directory or an id already in the local HF cache. ``dtype="auto"``
        (the default, as in training and serving) is bfloat16 where its products are
        native and float32 elsewhere: emulated bfloat16 on a CPU without AVX512-BF16 / AMX
        made the embedded Gemma's verify forward ~4x slower (measured, 2-core AVX2 EPYC).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_dtype = resolve_dtype(dtype, device)
        t0 = time.perf_counter()
        if embedded.is_embedded(name_or_path):
            path = str(embedded.ensure_embedded(verify=verify_cache))
            name = embedded.EMBEDDED_CANONICAL
        else:
            path = _resolve_path(name_or_path)
            name = name_or_path
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"could not load a causal LM from {path}: {e}") from e
        tokenizer = None
        if any((Path(path) / f).exists() for f in _TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        else:  # a weights-only directory still works at the token level
            log.warning("no tokenizer files in %s; token-level API only", path)
        model.to(device)
        log.info("loaded target %s (%s) in %.1f s", name, torch_dtype, time.perf_counter() - t0)
        return cls(model, tokenizer, name=name, prompt_format=prompt_format)

    # ------------------------------------------------------------------ facts
    @property
    def vocab_size(self) -> int:
        return int(self._lm_param.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self._first_param.dtype

    @property
    def device(self) -> torch.device:
        return self._first_param.device

    @property
    def eos_token_ids(self) -> list[int]:
        """Union of the tokenizer's and the generation config's end-of-sequence ids."""
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.config, self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if eos is None:
                continue
            ids.update([eos] if isinstance(eos, int) else list(eos))
        return sorted(ids)

    # ------------------------------------------------------------------ frozen pieces
    def get_lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, n] ids -> [B, n, d] input embeddings, including any model-specific scaling."""
        return self.model.get_input_embeddings()(input_ids)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] final normed hidden -> [..., V] fp32 logits (with the model's softcap)."""
        head = self.model.get_output_embeddings()
        kernel = self._head_kernel(hidden, head)
        if kernel == "blockwise":
            logits = skinny_linear(hidden, head.weight)
        elif kernel == "packed":
            logits = packed_linear.packed(head.weight).linear(hidden)
        else:
            logits = head(hidden).float()
        return self.softcap(logits)

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's final-logit softcap (identity without one), for logits computed from
        rows of the LM head outside :meth:`lm_head`."""
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _head_kernel(self, hidden: torch.Tensor, head: nn.Module) -> str:
        """Which product :meth:`lm_head` uses for these rows (one of ``HEAD_KERNELS``)."""
        rows = hidden.numel() // max(hidden.shape[-1], 1)
        w = getattr(head, "weight", None)
        cands = ["library"]
        if isinstance(head, nn.Linear) and head.bias is None and w.device.type == "cpu" and rows >= 1 \
                and w.dtype == torch.float32 and hidden.dtype == torch.float32:
            if rows <= _SKINNY_ROWS[1]:
                cands.append("blockwise")
            if self.packing and not (torch.is_grad_enabled() and (hidden.requires_grad or w.requires_grad)):
                cands.append("packed")  # no autograd through oneDNN's op
        if self.head_kernel is not None:
            if self.head_kernel not in cands:
                raise ValueError(f"head_kernel {self.head_kernel!r} is not available for {rows} rows here "
                                 f"(candidates: {', '.join(cands)})")
            return self.head_kernel
        if "packed" in cands:
            return "packed"
        if "blockwise" not in cands:
            return "library"
        if rows >= _SKINNY_ROWS[0]:
            return "blockwise"
        key = (rows, w.shape[0])
        if key not in _few_rows_choice:  # time both once: the faster depends on the CPU
            spent = {}
            for c in ("library", "blockwise"):
                with self.head_kernel_forced(c):
                    t0 = time.perf_counter()
                    self.lm_head(hidden)
                    spent[c] = time.perf_counter() - t0
            _few_rows_choice[key] = min(spent, key=spent.get)
        return _few_rows_choice[key]

    @contextlib.contextmanager
    def _set_for_block(self, name: str, value: Any) -> Iterator[None]:
        before = getattr(self, name)
        setattr(self, name, value)
        try:
            yield
        finally:
            setattr(self, name, before)

    def head_kernel_forced(self, kernel: str | None) -> contextlib.AbstractContextManager[None]:
        """Set :attr:`head_kernel` for a block (None: the automatic choice)."""
        if kernel is not None and kernel not in HEAD_KERNELS:
            raise ValueError(f"head kernel must be one of {HEAD_KERNELS} or None, got {kernel!r}")
        return self._set_for_block("head_kernel", kernel)

    def use_packed_linears(self, on: bool) -> int:
        """Route the decoder layers' few-row fp32 CPU products and the LM head through oneDNN
        on prepacked weights (:mod:`dspark.packed_linear`), or back to the library GEMM.
        Returns how many layers now use it."""
        self.packing = bool(on) and packed_linear.usable()
        if self.packing:
            self.packed_linears = packed_linear.install(self.layers)
        else:
            packed_linear.uninstall(self.layers)
            self.packed_linears = 0
        return self.packed_linears

    # ------------------------------------------------------------------ next tokens
    def _screened_head(self) -> Any:
        """The fp16 screen of the LM head, built on first use; None where it does not apply
        (not fp32 on a CPU, a head with a bias, or the screen forced off)."""
        if self.screen_head is False:
            return None
        head = self.model.get_output_embeddings()
        w = self._lm_param
        if w.device.type != "cpu" or w.dtype != torch.float32 or not isinstance(head, nn.Linear) or head.bias is not None:
            return None
        if self._screen is None or self._screen.weight is not w:
            from dspark.screened_head import ScreenedHead

            try:
                screen = ScreenedHead(w, self._softcap)
            except ValueError as e:
                log.info("LM head screen off: %s", e)
                self.screen_head = False
                return None
            problem = screen.self_check()
            if problem:
                log.warning("LM head screen off: %s", problem)
                self.screen_head = False
                return None
            self._screen = screen
        return self._screen

    def screen_mode(self, mode: bool | None) -> contextlib.AbstractContextManager[None]:
        """Set :attr:`screen_head` for a block (False: every token from the full head)."""
        return self._set_for_block("screen_head", mode)

    def screens(self, rows: int, params: SamplingParams) -> bool:
        """Whether :meth:`next_tokens` picks ``rows`` tokens through the fp16 screen.

        Automatic choice: only for 1-4 rows of a head of at least 2^24 weights (where the
        product is bound by memory bandwidth), decided by timing the screen against the
        full head once per row count. top-k / top-p always use the full head."""
        if params.top_k or params.top_p < 1.0 or self.screen_head is False:
            return False
        if self.screen_head is None and (rows > 4 or self._lm_param.numel() < 2**24):
            return False
        head = self._screened_head()
        if head is None:
            return False
        if self.screen_head:
            return True
        if rows not in self._screen_faster:
            h = torch.randn(rows, self.hidden_size) * 50
            spent = {}
            for name, fn in (("full", self.lm_head), ("screen", head.bounds)):
                best = float("inf")
                for _ in range(2):
                    t0 = time.perf_counter()
                    fn(h)
                    best = min(best, time.perf_counter() - t0)
                spent[name] = best
            self._screen_faster[rows] = spent["screen"] < spent["full"]
            log.info("LM head for %d row(s): screen %.1f ms, full %.1f ms -> %s", rows, 1e3 * spent["screen"],
                     1e3 * spent["full"], "screen" if self._screen_faster[rows] else "full")
        return self._screen_faster[rows]

    @torch.inference_mode()
    def next_tokens(self, hidden: torch.Tensor, params: SamplingParams, gens: Generators = None) -> torch.Tensor:
        """[N, d] final normed hidden states -> [N] next ids: the argmax of the logits when
        greedy, else a draw from the processed distribution, one row per generator. Same
        distribution as ``sample_from_logits(lm_head(hidden), ...)``; through the fp16
        screen where :meth:`screens` says so (exact as well, dspark.screened_head)."""
        if hidden.dim() != 2:
            raise ValueError(f"next_tokens expects [N, d] hidden states, got {tuple(hidden.shape)}")
        if not self.screens(hidden.shape[0], params):
            return sample_from_logits(self.lm_head(hidden), params, gens)
        head = self._screened_head()
        h = hidden.float()
        if params.greedy:
            return head.argmax(h)
        return head.sample(h, params.temperature, gens)

    # ------------------------------------------------------------------ cache
    def new_cache(self, rollback: bool = True) -> Any:
        """A KV cache that can be rolled back, also after a sliding window has filled.

        Sliding-window layers normally drop old entries as soon as they pass the window,
        after which HF refuses to crop. Past recording keeps them until the next
        :meth:`rollback`, which then restores the window. ``rollback=False``: a plain cache
        for decoding that never rolls back (no recording; do not call :meth:`rollback`).
        """
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if rollback:
            cache.activate_past_recording()
        return cache

    @staticmethod
    def cache_length(cache: Any) -> int:
        return 0 if cache is None else int(cache.get_seq_length())

    @staticmethod
    def rollback(cache: Any, n: int) -> None:
        """Drop the last ``n`` tokens from ``cache``. Call after every forward (``n=0`` to
        keep everything): it also trims the sliding layers' recorded past."""
        if n < 0:
            raise ValueError(f"rollback count must be >= 0, got {n}")
        cache.crop(-n)

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Any | None = None,
        *,
        logits: str = "all",
        taps: Sequence[int] = (),
        final_hidden: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> TargetOutput:
        """Run the target over new tokens.

        input_ids: [B, n] token ids appended after what ``cache`` holds (absolute
            positions continue from the cache length; without a cache they start at 0,
            so right padding never changes earlier positions' outputs).
        logits: "all" -> [B, n, V]; "last" -> [B, 1, V]; "none" -> no LM head.
        taps: decoder layer indices (0-based, negative allowed) whose outputs to return.
        model_kwargs: passed to the decoder as is (``attention_mask``, ``position_ids``:
            see :mod:`dspark.batch_verify`).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, n], got shape {tuple(input_ids.shape)}")
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be all, last or none, got {logits!r}")
        captured: dict[int, torch.Tensor] = {}
        hooks = []
        for raw in taps:
            idx = raw % self.num_layers
            if not -self.num_layers <= raw < self.num_layers:
                raise ValueError(f"tap layer {raw} out of range for {self.num_layers} layers")

            def hook(_m: nn.Module, _inp: Any, out: Any, idx: int = idx) -> None:
                captured[idx] = out[0] if isinstance(out, tuple) else out

            hooks.append(self.layers[idx].register_forward_hook(hook))
        try:
            out = self.decoder(
                input_ids=input_ids.to(self.device),
                use_cache=cache is not None,
                **{self._cache_kw: cache},
                **(model_kwargs or {}),
            )
        finally:
            for h in hooks:
                h.remove()
        hidden = out.last_hidden_state
        lg = None
        if logits == "all":
            lg = self.lm_head(hidden)
        elif logits == "last":
            lg = self.lm_head(hidden[:, -1:])
        return TargetOutput(logits=lg, taps=captured, final_hidden=hidden if final_hidden else None)

    # ------------------------------------------------------------------ text
    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ModelLoadError(f"target {self.name} was loaded without a tokenizer")
        return self.tokenizer

    def encode_prompt(self, prompt: str | list[Message]) -> list[int]:
        """Prompt ids via the chat template if the tokenizer has one, else the plain template."""
        return self.prompt_format.encode(self._need_tokenizer(), prompt)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._need_tokenizer().decode(list(ids), skip_special_tokens=skip_special_tokens)

"""Iteration-level batching for a transformers causal LM: concurrent requests decode together.

One thread owns the model. Between two decode steps it runs queued calls (logits for the gate and
the benchmark), drops rows whose client went away, and lets waiting requests join: each new
request is prefilled alone, gives its first token at once, and its KV cache joins the running
batch, left-padded to the batch's length. A decode step then feeds every row's last token together
and picks each row's next token with that request's own settings and random generator.

Why not `generate`: it runs a fixed batch to its end, so a request arriving mid-way waits for the
longest answer. Why not transformers' continuous-batching `generate_batch`: on this project's
2-core CPU it gave 44 tok/s where a plain padded batch gave 189 (see the CPU batching issue).

Rows are left-padded, so each row passes its own position ids and the attention mask hides the
padding. When rows leave, columns that are padding in every remaining row are cut off.
"""

from __future__ import annotations

import inspect
import logging
import secrets

import torch
import torch.nn.functional as F

from deploy.engines.base import TokenLogprob
from deploy.engines.lean_imports import cache_utils_without_hqq
from deploy.engines.model_thread import ModelThread
from deploy.engines.requests import END, Request

_cache_utils = cache_utils_without_hqq()  # 1.4 s less on a CPU start (lean_imports.py)
DynamicCache, DynamicLayer = _cache_utils.DynamicCache, _cache_utils.DynamicLayer

log = logging.getLogger(__name__)

class Batcher(ModelThread):
    def __init__(self, model, *, max_batch_size: int, eos: set[int], device: str):
        super().__init__("batcher")
        self.model = model
        self.device = device
        self.eos = eos
        self.max_batch_size = max_batch_size
        self._rows: list[Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache length]: 1 real, 0 padding
        self._cache_kw = _cache_keyword(model)
        self._prefix = _SharedPrefix()
        self._thread.start()

    # -- what the engine reads, from any thread (submit, call, cancel: model_thread.py) --------

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def shared_prefix_tokens(self) -> int:
        return len(self._prefix.ids)

    # -- the model thread ------------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._rows)

    def _admit_locked(self) -> list[Request]:
        joining = []
        while self._waiting and len(self._rows) + len(joining) < self.max_batch_size:
            joining.append(self._waiting.popleft())
        return joining

    def _run(self) -> None:
        with torch.inference_mode():
            while (work := self._next_work()) is not None:
                calls, joining = work
                try:
                    self._iterate(calls, joining)
                except Exception as exc:  # a bug here must fail requests, never hang them
                    log.exception("the batcher failed")
                    for r in joining:
                        r.sink(exc)
                        r.sink(END)
                    self._fail_everything(exc)
                    self._cache = self._mask = None
        self._fail_everything(RuntimeError("The engine was closed while this request ran."))

    def _iterate(self, calls: list, joining: list[Request]) -> None:
        self._run_calls(calls)
        self._drop_cancelled()
        if joining:
            self._admit(joining)
        if self._rows:
            self._step_all()

    def _admit(self, requests: list[Request]) -> None:
        """Prefill the joining requests together (left-padded), hand out their first tokens, and
        add their KV cache to the running batch."""
        for r in requests:
            if r.cancelled.is_set():
                r.sink(END)
        requests = [r for r in requests if not r.cancelled.is_set()]
        if not requests:
            return
        try:
            for r in requests:
                if r.temperature > 0:
                    r.generator = torch.Generator(device=self.device)
                    r.generator.manual_seed(r.seed if r.seed is not None else secrets.randbits(63))
            cache, mask, logits = self._prefill(requests)
            for r in requests:
                r.length = len(r.prompt)
            tokens, scores = self._pick(logits, requests)
        except BaseException as exc:  # these requests fail; the running batch goes on
            for r in requests:
                r.sink(exc)
                r.sink(END)
            return
        first = len(self._rows)
        self._join(requests, cache, mask)
        done = [first + i for i, (r, t, s) in enumerate(zip(requests, tokens, scores, strict=True))
                if self._advance(r, t, s)]
        if done:
            self._remove(done)

    def _prefill(self, requests: list[Request]):
        """The joining prompts through the model: their KV cache, its mask, last-token logits."""
        growing = self.max_batch_size > 1
        cache = new_cache(self.model.config, growing=growing)
        if len(requests) == 1 and growing:  # the usual case: requests arrive one by one
            prompt = requests[0].prompt
            start = self._prefix.seed(cache, prompt)
            ids = torch.tensor([prompt[start:]], device=self.device)
            positions = torch.arange(start, len(prompt), device=self.device)[None]
            logits = self._forward(ids, positions, None, cache)
            self._prefix.remember(cache, prompt)
            return cache, torch.ones(1, len(prompt), dtype=torch.long, device=self.device), logits
        longest = max(len(r.prompt) for r in requests)
        ids = torch.tensor([[0] * (longest - len(r.prompt)) + r.prompt for r in requests],
                           device=self.device)
        mask = torch.tensor([[0] * (longest - len(r.prompt)) + [1] * len(r.prompt)
                             for r in requests], device=self.device)
        padded = len({len(r.prompt) for r in requests}) > 1
        logits = self._forward(ids, (mask.cumsum(-1) - 1).clamp(min=0), mask if padded else None,
                               cache)
        return cache, mask, logits

    def _forward(self, ids, positions, mask, cache) -> torch.Tensor:
        # logits_to_keep=1: the prompt's other positions need no logits (a vocab-sized matmul per
        # prompt token, the larger part of a short prefill's cost).
        return self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                          use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}).logits[:, -1]

    def _step_all(self) -> None:
        rows = self._rows
        try:
            ids = torch.tensor([[r.last] for r in rows], device=self.device)
            positions = torch.tensor([[r.length] for r in rows], device=self.device)
            mask = F.pad(self._mask, (0, 1), value=1)
            padded = bool((mask == 0).any())
            out = self.model(input_ids=ids, position_ids=positions, use_cache=True,
                             attention_mask=mask if padded else None,
                             **{self._cache_kw: self._cache})
            self._mask = mask
            for r in rows:
                r.length += 1
            tokens, scores = self._pick(out.logits[:, -1], rows)
        except BaseException as exc:  # e.g. out of memory: every running request learns why
            log.exception("decode step failed")
            for r in rows:
                r.sink(exc)
                r.sink(END)
            self._rows, self._cache, self._mask = [], None, None
            return
        done = [i for i, (r, t, s) in enumerate(zip(rows, tokens, scores, strict=True))
                if self._advance(r, t, s)]
        if done:
            self._remove(done)

    def _advance(self, request: Request, token: int, score: TokenLogprob | None) -> bool:
        """Hand `token` over; a finished request's sink also gets END here (its row is cut off
        the batch afterwards)."""
        finished = self._hand_over(request, token, score)
        if finished:
            request.sink(END)
        return finished

    def _pick(self, logits: torch.Tensor, rows: list[Request]) -> tuple[list[int], list]:
        """Each row's next token, and its TokenLogprob where the row asked for log probabilities."""
        logits = logits.float()
        scored = [i for i, r in enumerate(rows) if r.logprobs is not None]
        # The model's own distribution, as OpenAI reports it: taken before penalties and temperature.
        logp = torch.log_softmax(logits[scored], -1) if scored else None
        for i, r in enumerate(rows):
            if r.presence_penalty or r.frequency_penalty or r.repetition_penalty != 1.0:
                logits[i] = penalized(logits[i], r)
        picked = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            if r.temperature > 0:
                picked[i] = _sample(logits[i], r.temperature, r.top_p, r.generator)
        scores: list[TokenLogprob | None] = [None] * len(rows)
        for j, i in enumerate(scored):
            k = rows[i].logprobs
            top = torch.topk(logp[j], k) if k else None
            scores[i] = TokenLogprob(picked[i], float(logp[j, picked[i]]), tuple(
                zip(top.indices.tolist(), top.values.tolist(), strict=True)) if k else ())
        return picked, scores

    # -- the batch's KV cache --------------------------------------------------------------------

    def _join(self, requests: list[Request], cache: DynamicCache, mask: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask = list(requests), cache, mask
            return
        length = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, length), _left_pad(new.keys, length)])
            old.values = torch.cat([_left_pad(old.values, length), _left_pad(new.values, length)])
        self._mask = torch.cat([F.pad(self._mask, (length - self._mask.shape[1], 0)),
                                F.pad(mask, (length - mask.shape[1], 0))])
        self._rows.extend(requests)

    def _remove(self, indices: list[int]) -> None:
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask[index]
        start = int(mask.any(0).nonzero()[0])  # columns before it are padding in every row
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self._mask = mask[:, start:]

    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self._rows) if r.cancelled.is_set()]
        for i in gone:
            self._rows[i].sink(END)
        if gone:
            self._remove(gone)

    def _fail_rows(self, exc: BaseException) -> None:
        rows, self._rows = self._rows, []
        for r in rows:
            r.sink(exc)
            r.sink(END)

def can_batch(model) -> bool:
    """Whether this model's KV cache is the plain per-layer kind the batcher pads and merges.
    Sliding-window and other special caches are served one request at a time instead."""
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # an unusual config: be safe
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class _SharedPrefix:
    """The KV of the prompt start that recent requests shared (the chat template's system prompt,
    a task's instructions), so that the next request with that start prefills only the rest. On the
    bundled model the default system prompt is half of a short question's prompt.

    It learns the longest common start of the last two prompts prefilled alone; one prefix is kept.
    """

    MIN_TOKENS = 8  # shorter shared starts are not worth the copy

    def __init__(self):
        self.ids: list[int] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last: list[int] = []

    def seed(self, cache: DynamicCache, prompt: list[int]) -> int:
        """Put the kept prefix into the empty `cache` if `prompt` starts with it (leaving at least
        one token to prefill); returns how many tokens of `prompt` that covers."""
        n = len(self.ids)
        if not n or n >= len(prompt) or prompt[:n] != self.ids:
            return 0
        for layer, (keys, values) in zip(cache.layers, self.kv, strict=True):
            _initialize(layer, keys, values)  # copied on the first update, never written
        return n

    def remember(self, cache: DynamicCache, prompt: list[int]) -> None:
        common = min(_common_start(prompt, self.last), len(prompt) - 1)
        self.last = prompt
        if common < self.MIN_TOKENS or common == len(self.ids) and prompt[:common] == self.ids:
            return
        self.ids = prompt[:common]
        self.kv = [(layer.keys[:, :, :common].clone(), layer.values[:, :, :common].clone())
                   for layer in cache.layers]


def _common_start(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def new_cache(config, growing: bool) -> DynamicCache:
    try:
        cache = DynamicCache(config=config)
    except TypeError:  # transformers before per-layer caches: one request at a time (can_batch)
        return DynamicCache()
    if growing:
        cache.layers = [_GrowingLayer() for _ in cache.layers]
    return cache


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes new keys and values into spare room at the end of its tensors
    instead of concatenating: `cat` copied the whole batch's cache at every step, a quarter of a
    batch-8 step on this project's CPU. `keys`/`values` stay views of the right length, so the
    batcher may replace them (join, remove) and the next update re-homes them."""

    SPARE = 64  # tokens of room added on each re-homing

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._kbuf = self._vbuf = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            _initialize(self, key_states[:, :, :0], value_states[:, :, :0])
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if not self._owns_room(key_states.shape[0], length + new):
            self._kbuf = _with_room(self.keys, key_states, length + new + self.SPARE)
            self._vbuf = _with_room(self.values, value_states, length + new + self.SPARE)
        self._kbuf[:, :, length:length + new] = key_states
        self._vbuf[:, :, length:length + new] = value_states
        self.keys = self._kbuf[:, :, :length + new]
        self.values = self._vbuf[:, :, :length + new]
        return self.keys, self.values

    def _owns_room(self, batch: int, needed: int) -> bool:
        buf = self._kbuf
        return (buf is not None and buf.shape[0] == batch and buf.shape[2] >= needed
                and self.keys.data_ptr() == buf.data_ptr() and self.keys.shape[0] == batch)


def _initialize(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    # What DynamicLayer.lazy_initialization sets, done here: its signature changed across
    # transformers releases, and the layer should start from these tensors, not an empty one.
    layer.dtype, layer.device = keys.dtype, keys.device
    layer.keys, layer.values = keys, values
    layer.is_initialized = True


def _with_room(current: torch.Tensor, new: torch.Tensor, capacity: int) -> torch.Tensor:
    batch, heads, _, dim = new.shape
    buf = new.new_empty(batch, heads, capacity, dim)
    if current.numel():
        buf[:, :, :current.shape[-2]] = current
    return buf


def _cache_keyword(model) -> str:
    # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns, and goes
    # in 5.40); older releases know only the old one.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(t, (0, 0, length - t.shape[-2], 0))


def penalized(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """One row's logits with its request's penalties applied (a new tensor)."""
    logits = logits.clone()
    if request.counts and (request.presence_penalty or request.frequency_penalty):
        ids = torch.tensor(list(request.counts), device=logits.device)
        times = torch.tensor(list(request.counts.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= request.frequency_penalty * times + request.presence_penalty
    if request.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.prompt) | set(request.counts)), device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / request.repetition_penalty,
                                   values * request.repetition_penalty)
    return logits


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    logits = logits / temperature
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        ordered, order = logits.sort(descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p
        ordered[outside] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, ordered)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))

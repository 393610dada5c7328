"""GswarmConnector: a vLLM V1 KV connector that hands KV over through pdgrpc's gswarm-compatible store.

vLLM loads it from ``KVTransferConfig(kv_connector="GswarmConnector", kv_role="kv_producer" |
"kv_consumer" | "kv_both", kv_connector_module_path="pdgrpc.engine.vllm_connector",
kv_connector_extra_config={"store": "HOST:PORT", "use_shm": bool, "layers_per_group": 6})``;
the store's token, if any, comes from $PDGRPC_STORE_TOKEN (vLLM logs its config). Requests opt in
through ``SamplingParams.extra_args["kv_transfer_params"]["pdgrpc"]``:

* producer: ``{"save": {"owner": OWNER, "lease_s": S, "key_prefix": P}}``
* consumer: ``{"load": {"num_tokens": T, "groups": [{"key", "shm_name", "size", "crc32",
  "layer_start", "layer_end"}, ...]}}``

Wire layout (``WIRE_LAYOUT``): one store entry per layer group, ``[layer][k|v][kv_head][token][dim]``
in the model's dtype for tokens [0, T) of the prompt -- pdgrpc's own KV layout, whatever the paged
layout of the attention backend and whatever the block size on either side. ``vllm_paged.PagedBlocks``
maps it to and from vLLM's paged KV (the layouts it supports are listed there); other backends are
refused when the caches are registered.

Protocol, in call order (S: scheduler process, W: worker process):

Producer (prefill node)
  S get_num_new_matched_tokens  -> 0: a producer loads nothing
  S build_connector_meta        a SaveJob for each opted-in request whose prompt completes in this step
                                 (its block ids, prompt length, owner, key prefix, layer groups)
  W save_kv_layer(layer)        as the forward runs: copy the layer's prompt KV out of its paged blocks
                                 into its group's buffer, which on the same host is a region reserved
                                 in this worker's shm arena (else a pooled buffer); a complete group
                                 goes to the put thread (arena region: CRC and commit, no copy; buffer:
                                 one copy into the arena, a segment of its own when the arena is full,
                                 or HTTP PUT) while the next layers compute             SAVING
  W wait_for_save               wait until every put of the step is in the store: the blocks are
                                 never freed before the save is complete            SAVED | FAILED
  W build_connector_worker_meta the put results (key, size, crc32, shm name, lease expiry) or the error
  S request_finished            the step sampled the first token: returns (False, params); ``params``
                                 is filled by update_connector_output of the same step, which vLLM
                                 runs before it sends that step's outputs, so the request's output
                                 carries complete descriptors
  S update_connector_output     fills the params from the worker meta
  An aborted request's entries are released by owner by the worker (and by the node).

Consumer (decode node); the request's prompt is the prefill prompt plus the first token
  S get_num_new_matched_tokens  -> (T - local hit, True): the whole prompt, loaded asynchronously;
                                 0 after a failed load of the same request (vLLM then recomputes)
  S update_state_after_alloc    remember the blocks allocated for the request                PENDING
  S build_connector_meta        a LoadJob per request with blocks (block ids, first token, groups)
  W start_load_kv               hand the LoadJob to the load thread: fetch each group (shm segment or
                                 HTTP), check size and CRC-32, scatter into the blocks, release the
                                 store entry                                                  LOADING
  W wait_for_layer_load         nothing to wait for: vLLM keeps the request out of every forward
                                 until its load is reported finished
  W get_transfer_results        finished loads; failed ones also in failed_recving    LOADED | FAILED
                                 (with kv_load_failure_policy="recompute" vLLM then recomputes the
                                 prompt: bad KV is never decoded from)
  W build_connector_worker_meta the load results (tokens, seconds, error)
  S request_finished            (False, {"pdgrpc": {"load": result}})
vLLM computes only the one token that is not in the store (the prefill's first token), so the decode
side recomputes nothing of the prompt; ``RequestOutput.num_cached_tokens`` equals T.
"""

from __future__ import annotations

import concurrent.futures
import enum
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger

from pdgrpc.engine.tensor_pool import TensorPool
from pdgrpc.engine.vllm_engine import PARAMS_KEY, WIRE_LAYOUT
from pdgrpc.engine.vllm_paged import LAYOUT_MODES, PagedBlocks, probe_cpu_layout
from pdgrpc.kvstore.sync_client import Reservation, StoreError, SyncStore

log = init_logger("vllm.gswarm_connector")  # under "vllm": vLLM's log handlers apply

MIN_GROUP_BYTES = 2 << 20  # short prompts go out in fewer, larger groups (as the torch engine does)


class TransferState(enum.Enum):
    PENDING = "pending"    # scheduled, not started by the worker yet
    SAVING = "saving"      # producer: layers being copied out and put in the store
    LOADING = "loading"    # consumer: groups being fetched and scattered into blocks
    SAVED = "saved"
    LOADED = "loaded"
    FAILED = "failed"
    RELEASED = "released"  # the store entries were released (aborted request, or loaded)



# ---- layer groups ------------------------------------------------------------------------------

def layer_groups(num_layers: int, bytes_per_layer: int, layers_per_group: int) -> list[tuple[int, int]]:
    """Layer ranges published as one entry each: ``layers_per_group`` layers, or more for short prompts."""
    per = max(1, layers_per_group, -(-MIN_GROUP_BYTES // max(1, bytes_per_layer)))
    return [(s, min(s + per, num_layers)) for s in range(0, num_layers, per)]


# ---- scheduler -> worker, worker -> scheduler ---------------------------------------------------

@dataclass
class SaveJob:
    req_id: str
    block_ids: list[int]
    num_tokens: int
    owner: str
    key_prefix: str
    lease_s: float


@dataclass(eq=False)
class _Save:
    """A prompt's KV being saved (worker side): one tensor per layer group, in the arena or pooled."""

    job: SaveJob
    groups: list[tuple[int, int]]
    tensors: list[torch.Tensor] = field(default_factory=list)
    reservations: dict[int, Reservation] = field(default_factory=dict)  # group -> region not yet put
    bases: list[torch.Tensor | None] = field(default_factory=list)  # pooled memory under buffers
    group_of: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # layer -> (group, start, end)
    puts: list[concurrent.futures.Future] = field(default_factory=list)


@dataclass
class LoadJob:
    req_id: str
    block_ids: list[int]
    first_token: int      # block-aligned local prefix hit: load from here
    num_tokens: int       # load up to here (the prompt; vLLM computes the rest)
    groups: list[dict]
    wire_tokens: int = 0  # tokens in the store entries (>= num_tokens)


@dataclass
class GswarmMeta(KVConnectorMetadata):
    saves: list[SaveJob] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)
    release_owners: list[str] = field(default_factory=list)


@dataclass
class GswarmWorkerMeta(KVConnectorWorkerMetadata):
    saves: dict[str, dict] = field(default_factory=dict)  # req_id -> {"groups": [...]} or {"error": ...}
    loads: dict[str, dict] = field(default_factory=dict)  # req_id -> {"ok", "tokens", "seconds", "error"?}

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, GswarmWorkerMeta)
        return GswarmWorkerMeta({**self.saves, **other.saves}, {**self.loads, **other.loads})


def _request_params(request) -> dict:
    params = getattr(request, "kv_transfer_params", None) or {}
    return params.get(PARAMS_KEY) or {}


class GswarmConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.block_size = vllm_config.cache_config.block_size
        self.layers_per_group = int(extra.get("layers_per_group", 6))
        self.store = SyncStore(str(extra["store"]), os.environ.get("PDGRPC_STORE_TOKEN") or None,
                               bool(extra.get("use_shm", True)))
        model = vllm_config.model_config
        self.num_kv_heads = model.get_num_kv_heads(vllm_config.parallel_config)
        self.head_dim = model.get_head_size()
        self.num_layers = model.get_num_layers(vllm_config.parallel_config)
        self.dtype = model.dtype
        # scheduler side
        self._matched: dict[str, int] = {}           # req_id -> local hit the load starts at
        self._load_jobs: dict[str, LoadJob] = {}     # allocated, not yet sent to the worker
        self._no_load: set[str] = set()              # a load failed once: recompute, never load again
        self._prompts: dict[str, tuple[dict, int, list[int]]] = {}  # producer: save opts, prompt, blocks
        self._inflight: set[str] = set()             # saves and loads sent to the worker, no result yet
        self._results: dict[str, tuple[str, dict]] = {}  # req_id -> ("save" | "load", worker result)
        self._params: dict[str, dict] = {}           # req_id -> params returned before the result came
        self._forget: set[str] = set()               # finished requests whose result nobody needs
        self._release: list[str] = []                # owners whose entries the worker releases
        self.state: dict[str, TransferState] = {}
        # worker side
        self._paged: dict[int, PagedBlocks] = {}
        self._numpy_paged: dict[int, PagedBlocks] = {}
        self._layer_of: dict[str, int] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="gswarm")
        self._saves: dict[str, _Save] = {}
        self._buffers = TensorPool()  # a fresh save buffer would fault its pages in during the forward
        self._loads: dict[str, concurrent.futures.Future] = {}
        self._worker_meta = GswarmWorkerMeta()
        self.counters = {"saved_tokens": 0, "loaded_tokens": 0, "failed_loads": 0, "failed_saves": 0}

    # ======== worker side ========

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        ctx = self._vllm_config.compilation_config.static_forward_context
        backends = set()
        for name, cache in kv_caches.items():
            layer = ctx.get(name)
            backend = layer.attn_backend.get_name() if layer is not None and hasattr(layer, "attn_backend") else "?"
            mode = LAYOUT_MODES.get(backend)
            if mode is None or cache.dim() != 4 or cache.shape[2] != self.block_size:
                raise ValueError(f"GswarmConnector: attention backend {backend} with KV cache shape "
                                 f"{tuple(cache.shape)} is not supported (block size {self.block_size})")
            if mode == "cpu" and not backends:
                backend += "/" + probe_cpu_layout(self.dtype, self.block_size, self.num_kv_heads, self.head_dim)
            backends.add(backend)
            index = int(re.findall(r"\.(\d+)\.", "." + name + ".")[0])
            self._layer_of[name] = index
            self._paged[index] = PagedBlocks(cache, mode, self.block_size, self.num_kv_heads, self.head_dim)
            if cache.device.type == "cpu":  # loads run in a thread: numpy copies start no OpenMP team
                arr = cache.view(torch.int16 if cache.element_size() == 2 else torch.int32).numpy()
                self._numpy_paged[index] = PagedBlocks(arr, mode, self.block_size, self.num_kv_heads,
                                                       self.head_dim)
        log.info("GswarmConnector: %d layers, attention %s, block size %d", len(self._paged), sorted(backends),
                 self.block_size)
        if self._kv_transfer_config.kv_role in ("kv_producer", "kv_both"):
            self.store.open_arena()  # saves gather straight into it; opened now, not in the first forward

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, GswarmMeta):
            return
        for owner in meta.release_owners:
            self._pool.submit(self._release_owner, owner)
        for job in meta.loads:
            self._loads[job.req_id] = self._pool.submit(self._load, job)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: the request takes part in no forward before its load is done

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, GswarmMeta) or not meta.saves:
            return
        index = self._layer_of[layer_name]
        for job in meta.saves:
            save = self._saves.get(job.req_id)
            if save is None:
                save = self._saves[job.req_id] = self._start_save(job)
            g, start, end = save.group_of[index]
            self._paged[index].gather(job.block_ids, job.num_tokens, save.tensors[g][index - start])
            if index == end - 1:
                save.puts.append(self._pool.submit(self._put_group, job, save, g))

    def _start_save(self, job: SaveJob) -> _Save:
        """Where each layer group of a prompt is gathered: straight into a region of the store's shm
        arena (the put then only commits it: KV goes from vLLM's paged cache into shared memory in
        one copy), else into a pooled buffer that the put copies."""
        groups = layer_groups(self.num_layers, self._layer_bytes(job.num_tokens), self.layers_per_group)
        shape = (2, self.num_kv_heads, job.num_tokens, self.head_dim)
        save = _Save(job, groups)
        for g, (start, end) in enumerate(groups):
            r = self.store.reserve((end - start) * self._layer_bytes(job.num_tokens))
            if r is not None:
                save.reservations[g] = r
                save.tensors.append(torch.frombuffer(r.view, dtype=self.dtype).view(end - start, *shape))
            else:
                buf, base = self._buffers.take((end - start, *shape), self.dtype)
                save.bases.append(base)
                save.tensors.append(buf)
            for index in range(start, end):
                save.group_of[index] = (g, start, end)
        self.state[job.req_id] = TransferState.SAVING
        return save

    def wait_for_save(self) -> None:
        for req_id in list(self._saves):
            save = self._saves.pop(req_id)
            job, futures = save.job, save.puts
            try:
                if len(futures) != len(save.groups):
                    raise StoreError("INTERNAL", f"saved {len(futures)} of {len(save.groups)} layer groups")
                descriptors = [f.result() for f in futures]
                result = {"state": TransferState.SAVED.value, "groups": descriptors, "num_tokens": job.num_tokens,
                          "layout": WIRE_LAYOUT}
                self.counters["saved_tokens"] += job.num_tokens
            except Exception as exc:  # noqa: BLE001 -- reported to the node, which fails the request
                for f in futures:
                    f.cancel()
                concurrent.futures.wait(futures)
                code = exc.code if isinstance(exc, StoreError) else "INTERNAL"
                result = {"state": TransferState.FAILED.value, "error": {"code": code, "message": str(exc)}}
                self.counters["failed_saves"] += 1
                self._pool.submit(self._release_owner, job.owner)
            self.state.pop(req_id, None)
            self._worker_meta.saves[req_id] = result
            # Every put has ended (result() or wait above): regions never put go back, buffers serve
            # the next save.
            for r in save.reservations.values():
                self.store.abandon(r)
            save.tensors.clear()
            for base in save.bases:
                self._buffers.give(base)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = {r for r, f in self._loads.items() if f.done()}
        for r in done:
            self._worker_meta.loads[r] = self._loads.pop(r).result()
            self.state.pop(r, None)
        return None, done or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        _, done = self.get_finished(finished_req_ids)
        failed = {r for r in (done or ()) if not self._worker_meta.loads[r]["ok"]}
        return KVConnectorTransferResults(finished_recving=set(done or ()), failed_recving=failed)

    def build_connector_worker_meta(self) -> GswarmWorkerMeta | None:
        if not self._worker_meta.saves and not self._worker_meta.loads:
            return None
        meta, self._worker_meta = self._worker_meta, GswarmWorkerMeta()
        return meta

    def _layer_bytes(self, num_tokens: int) -> int:
        return 2 * self.num_kv_heads * num_tokens * self.head_dim * self.dtype.itemsize

    def _put_group(self, job: SaveJob, save: _Save, index: int) -> dict:
        t0 = time.monotonic()
        key = f"{job.key_prefix}.g{index}"
        r = save.reservations.pop(index, None)
        if r is not None:  # gathered in the arena already: commit the region
            answer = self.store.put_reserved(key, r, job.owner, job.lease_s)
        else:
            view = memoryview(save.tensors[index].view(torch.uint8).numpy()).cast("B")
            answer = self.store.put(key, view, job.owner, job.lease_s)
        start, end = save.groups[index]
        return {"key": answer["key"], "size": int(answer["size"]), "crc32": int(answer["crc32"]),
                "location": answer["location"], "lease_expiry_unix": float(answer["lease_expiry_unix"]),
                "shm_name": answer["shm_name"], "shm_offset": int(answer.get("shm_offset", 0)),
                "layer_start": start, "layer_end": end,
                "seconds": time.monotonic() - t0}

    def _load(self, job: LoadJob) -> dict:
        """In the load thread: fetch, check and scatter every group, then release the entries."""
        t0 = time.monotonic()
        self.state[job.req_id] = TransferState.LOADING
        result: dict = {"ok": True, "state": TransferState.LOADED.value, "tokens": job.num_tokens - job.first_token}
        try:
            for g in job.groups:
                start, end = int(g["layer_start"]), int(g["layer_end"])
                expected = (end - start) * self._layer_bytes(job.wire_tokens)
                if int(g["size"]) != expected:
                    raise StoreError("INVALID_ARGUMENT", f"{g['key']}: {g['size']} bytes, layout needs {expected}")
                data = self.store.get(g["key"], g.get("shm_name", ""), int(g["size"]), int(g["crc32"]),
                                      int(g.get("shm_offset", 0)))
                self._scatter(job, start, end, data)
            self.counters["loaded_tokens"] += result["tokens"]
        except Exception as exc:  # noqa: BLE001 -- reported as a failed receive: vLLM recomputes
            code = exc.code if isinstance(exc, StoreError) else "INTERNAL"
            log.warning("GswarmConnector: load of %s failed (%s): %s", job.req_id, code, exc)
            result = {"ok": False, "state": TransferState.FAILED.value, "tokens": 0,
                      "error": {"code": code, "message": str(exc)}}
            self.counters["failed_loads"] += 1
        for g in job.groups:  # loaded (or useless): the store's copy has served its purpose
            try:
                self.store.release(g["key"])
            except StoreError as exc:
                log.warning("GswarmConnector: release of %s failed: %s", g["key"], exc)
        result["seconds"] = time.monotonic() - t0
        return result

    def _scatter(self, job: LoadJob, start: int, end: int, data: bytes) -> None:
        shape = (end - start, 2, self.num_kv_heads, job.wire_tokens, self.head_dim)
        if self._numpy_paged:
            import numpy as np

            src = np.frombuffer(data, dtype=np.int16 if self.dtype.itemsize == 2 else np.int32).reshape(shape)
            paged = self._numpy_paged
        else:
            src = torch.frombuffer(bytearray(data), dtype=self.dtype).view(shape)
            src = src.to(next(iter(self._paged.values())).kv[0].device)
            paged = self._paged
        for i, layer in enumerate(range(start, end)):
            paged[layer].scatter(job.block_ids, src[i, :, :, :job.num_tokens], job.first_token)

    def _release_owner(self, owner: str) -> None:
        try:
            self.store.release_owner(owner)
        except StoreError as exc:
            log.warning("GswarmConnector: release of owner %s failed: %s", owner, exc)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        if self._paged:
            log.info("GswarmConnector: %s", self.counters)

    # ======== scheduler side ========

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # save_kv_layer runs between layers

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        load = _request_params(request).get("load")
        if not load or request.request_id in self._no_load:
            return 0, False
        num_tokens = min(int(load["num_tokens"]), request.num_tokens - 1)  # one token must be computed
        self._matched[request.request_id] = num_computed_tokens
        return max(num_tokens - num_computed_tokens, 0), num_tokens > num_computed_tokens

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        load = _request_params(request).get("load")
        if num_external_tokens <= 0 or not load:
            return
        first = self._matched.pop(request.request_id, 0)
        self._load_jobs[request.request_id] = LoadJob(
            request.request_id, list(blocks.get_block_ids()[0]), first, first + num_external_tokens,
            list(load["groups"]), int(load["num_tokens"]))
        self.state[request.request_id] = TransferState.PENDING

    def build_connector_meta(self, scheduler_output) -> GswarmMeta:
        meta = GswarmMeta(loads=list(self._load_jobs.values()), release_owners=self._release)
        self._inflight.update(self._load_jobs)
        self._load_jobs, self._release = {}, []
        if self._kv_transfer_config.is_kv_producer:
            self._add_saves(scheduler_output, meta)
        return meta

    def _add_saves(self, out, meta: GswarmMeta) -> None:
        """A SaveJob for each opted-in request whose prompt is complete after this step."""
        for new in out.scheduled_new_reqs:
            extra = (new.sampling_params.extra_args or {}) if new.sampling_params else {}
            save = ((extra.get("kv_transfer_params") or {}).get(PARAMS_KEY) or {}).get("save")
            if save:
                self._prompts[new.req_id] = (save, len(new.prompt_token_ids or ()), list(new.block_ids[0]))
                self._maybe_save(new.req_id, new.num_computed_tokens + out.num_scheduled_tokens[new.req_id], meta)
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in self._prompts:
                continue
            save, prompt_len, blocks = self._prompts[req_id]
            if cached.new_block_ids[i] is not None:
                new_ids = list(cached.new_block_ids[i][0])
                blocks = new_ids if req_id in cached.resumed_req_ids else blocks + new_ids
                self._prompts[req_id] = (save, prompt_len, blocks)
            self._maybe_save(req_id, cached.num_computed_tokens[i] + out.num_scheduled_tokens[req_id], meta)

    def _maybe_save(self, req_id: str, computed: int, meta: GswarmMeta) -> None:
        save, prompt_len, blocks = self._prompts[req_id]
        if computed < prompt_len:
            return
        del self._prompts[req_id]
        job = SaveJob(req_id, blocks[:-(-prompt_len // self.block_size)], prompt_len, str(save["owner"]),
                      str(save.get("key_prefix") or save["owner"]), float(save.get("lease_s", 60.0)))
        meta.saves.append(job)
        self._inflight.add(req_id)
        self.state[req_id] = TransferState.SAVING

    def update_connector_output(self, connector_output) -> None:
        for req_id in connector_output.failed_recving or ():
            self._no_load.add(req_id)
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, GswarmWorkerMeta):
            return
        for kind, results in (("save", meta.saves), ("load", meta.loads)):
            for req_id, result in results.items():
                self._inflight.discard(req_id)
                self.state[req_id] = TransferState.FAILED if "error" in result else (
                    TransferState.SAVED if kind == "save" else TransferState.RELEASED)
                if kind == "load" and "error" in result:
                    self._no_load.add(req_id)
                params = self._params.pop(req_id, None)
                if params is not None:  # request_finished ran earlier in this step: complete its params
                    params[PARAMS_KEY][kind] = result
                    self.state.pop(req_id, None)
                elif req_id in self._forget:
                    self._forget.discard(req_id)
                    self.state.pop(req_id, None)
                else:
                    self._results[req_id] = (kind, result)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        req_id = request.request_id
        self._prompts.pop(req_id, None)
        self._matched.pop(req_id, None)
        self._load_jobs.pop(req_id, None)
        self._no_load.discard(req_id)
        params = _request_params(request)
        result = self._results.pop(req_id, None)
        inflight = req_id in self._inflight
        if not params:
            return False, None
        if request.status.name == "FINISHED_ABORTED" or (result is None and not inflight):
            if "save" in params:  # whatever was put for it has no reader now: release it by owner
                self._release.append(str(params["save"]["owner"]))
            if inflight:
                self._forget.add(req_id)
            self.state.pop(req_id, None)
            return False, None
        out: dict = {PARAMS_KEY: {}}
        if result is not None:
            out[PARAMS_KEY][result[0]] = result[1]
            self.state.pop(req_id, None)
        else:
            self._params[req_id] = out  # filled by update_connector_output of this same step
        return False, out

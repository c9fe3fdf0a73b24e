"""The stream: batches of windows through the model into the LayerStatistics, with
snapshots on the way, then the ranks of a sharded run merged into rank 0's."""
from __future__ import annotations

import os

import torch

from ..distributed import Shard
from ..errors import EmbgeomError, option
from ..extract import decoder_inputs, forward_hidden
from ..progress import token_progress
from ..snapshot import Snapshots
from ..stats.layers import LayerStatistics, NonFiniteHidden
from ..windows import POSITION_BITS, WindowPlan, iter_batches
from .._heap import HeapTrimmer
from .config import AnalysisConfig
from .resume import _check_skipped


def _counted_decoder(plan: WindowPlan, model, batch) -> torch.Tensor:
    """The decoder stack's counted mask: the plan applied to its own input ids (the
    document shifted right); with --exclude-special its start token is not counted."""
    ids = decoder_inputs(model, batch.input_ids)
    mask = plan.counted_in_batch(ids, batch.attention_mask.sum(1))
    if plan.exclude_special:
        mask[:, 0] = False
    return mask


class _explain_nonfinite:
    """Turns NonFiniteHidden into the fix that fits the model's dtype: a half-precision
    model may overflow (float32 is the fix); in float32 or float64 the weights or the
    computation themselves give NaN or inf."""

    def __init__(self, model):
        params = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        self.dtype = params.dtype if params is not None else None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None or not issubclass(kind, NonFiniteHidden):
            return False
        if self.dtype in (torch.float16, torch.bfloat16):
            advice = (f"the model overflows in {str(self.dtype).removeprefix('torch.')}: try "
                      f"{option('dtype', 'float32')}")
        else:
            name = str(self.dtype).removeprefix("torch.") if self.dtype is not None else "this dtype"
            advice = (f"the model runs in {name}, so this is not an overflow of half precision: its weights "
                      "or its computation give NaN or inf (check the checkpoint for NaN or inf weights)")
        raise EmbgeomError(f"{exc}; {advice}") from None


def _merge_ranks(shard: Shard, stats: LayerStatistics, n_seen: dict, n_padded: int, device):
    """Every rank's statistics and counts merged into rank 0's, one rank at a time
    (so rank 0 never holds more than one other rank's state); None elsewhere."""
    if not shard.is_main:
        shard.fold_to_main({"statistics": stats.state_dict(), "n_seen": n_seen, "n_padded": n_padded}, None)
        return None, None, None

    def fold(acc, part):
        acc["statistics"].merge(LayerStatistics.from_state_dict(part["statistics"], device=device))
        acc["n_seen"] = {s: acc["n_seen"][s] + part["n_seen"][s] for s in acc["n_seen"]}
        acc["n_padded"] += part["n_padded"]
        return acc

    merged = shard.fold_to_main({"statistics": stats, "n_seen": dict(n_seen), "n_padded": n_padded}, fold)
    return merged["statistics"], merged["n_seen"], merged["n_padded"]


def new_statistics(cfg: AnalysisConfig, facts, device, type_layers: dict | None, n_types: int | None) -> LayerStatistics:
    """Empty statistics for this run's model and options."""
    return LayerStatistics(facts.n_layers, facts.widths, device, outlier_factor=cfg.outlier_factor,
                           with_types=cfg.token_types != "none", type_layers=type_layers,
                           type_capacity=(n_types or 0) + 1,
                           id_sample=cfg.id_points, seed=cfg.seed,
                           id_order="first" if cfg.id_first else "random", precision=cfg.precision,
                           cross_layer=cfg.cross_layer, window_measures=cfg.window_measures)


def _add_batch(stats: LayerStatistics, loaded, plan: WindowPlan, batch, type_lut, head: int, pool: int,
               progress_state: dict) -> None:
    """One batch through the model, every stack's hidden states into `stats`."""
    device, facts = loaded.device, loaded.facts
    is_ed = facts.kind == "encoder-decoder"
    n_seen = progress_state["n_seen"]
    b = batch.to(device)
    hidden = forward_hidden(loaded.model, b.input_ids, b.attention_mask, is_ed, single_stack=facts.kind)
    progress_state["n_padded"] += int(b.input_ids.numel())
    B, T = b.input_ids.shape
    positions = torch.arange(T, device=device).expand(B, T)
    windows = b.window_index.to(device)[:, None].expand(B, T)
    docs_ix = b.doc_index.to(device)[:, None].expand(B, T)
    for stack, hs in hidden.items():
        if stack == "decoder" and is_ed:
            ids = decoder_inputs(loaded.model, b.input_ids)
            counted = _counted_decoder(plan, loaded.model, b)
        else:
            ids, counted = b.input_ids, b.counted
        types = type_lut[ids] if type_lut is not None else ids
        meta = {"token_id": ids, "document": docs_ix, "window": windows, "position": positions}
        keys = (windows << POSITION_BITS) | positions
        calib = None
        if batch.head and pool > head:
            calib = (b.window_index < head).to(device)[:, None].expand(B, T)
        stats.update(stack, hs, counted, types, meta, keys=keys, calibration=calib)
        n_seen[stack] += int(counted.sum())


def stream_batches(stats: LayerStatistics, loaded, plan: WindowPlan, open_windows, cfg: AnalysisConfig,
                   shard: Shard, *, head: int, n_counted: int, type_lut, pad: int, progress_state: dict,
                   snaps: Snapshots | None, progress: bool) -> None:
    """Every batch of the windows (`open_windows()`: an iterator over them) into
    `stats`, this rank's batches only; a resumed run skips the batches before
    progress_state's next_batch, checking that they hold the tokens its snapshot
    says were done. Ends the stream (calibrating if that has not happened yet)."""
    gather = shard.gather_tensors if shard.world > 1 else None
    start = progress_state["next_batch"]
    nonfinite = _explain_nonfinite(loaded.model)
    with token_progress(n_counted, enabled=progress and shard.is_main, description=loaded.name) as advance, \
            torch.no_grad(), nonfinite:
        windows = open_windows()
        trim_heap = HeapTrimmer()
        # The calibration windows are batched apart (their batches come first), in a
        # pool rounded up to whole batches: no short batch of leftovers, so the
        # forward passes are those of a plain loop. Only the first `head` windows
        # give the median.
        pool = -(-head // cfg.batch_size) * cfg.batch_size
        skipped, index = 0, -1  # counted tokens of this rank's batches before the resumed one
        for index, batch in enumerate(iter_batches(windows, cfg.batch_size, pad, head=pool)):
            if index < start:  # done before the snapshot this run resumes from
                skipped += batch.n_counted if shard.owns(index) else 0
                advance(batch.n_counted)
                continue
            if index == start and start:
                _check_skipped(snaps, skipped, progress_state)
            if not batch.head:
                stats.calibrate(gather)
            if not shard.owns(index):
                advance(batch.n_counted)
                continue
            _add_batch(stats, loaded, plan, batch, type_lut, head, pool, progress_state)
            progress_state["tokens_done"] += batch.n_counted
            progress_state["next_batch"] = index + 1
            advance(batch.n_counted)
            trim_heap()
            if snaps is not None and stats.calibrated and snaps.due():
                snaps.save({"statistics": stats.state_dict(), **progress_state})
    if start and index < start:  # resumed after the last batch, or a next_batch past the stream
        _check_skipped(snaps, skipped, progress_state, index + 1 == start)
    with nonfinite:
        stats.finish(gather)
    trim_heap(force=True)


def merge_ranks(shard: Shard, stats: LayerStatistics, progress_state: dict, device):
    """(statistics, n_seen, n_padded, torch's thread count to restore after the
    metrics or None): a sharded run's ranks merged into rank 0's, whose metrics may
    use the finished ranks' threads; statistics None on the other ranks."""
    n_seen, n_padded = progress_state["n_seen"], progress_state["n_padded"]
    threads = None
    if shard.world > 1:
        stats, n_seen, n_padded = _merge_ranks(shard, stats, n_seen, n_padded, device)
        if stats is None:
            return None, None, None, None
        # The other ranks on this machine are done: the end-of-run metrics may use
        # their CPU threads too (torchrun gives each worker one by default).
        threads = torch.get_num_threads()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        torch.set_num_threads(max(threads, min(os.cpu_count() or 1, threads * local)))
    return stats, n_seen, n_padded, threads

"""`t12k reproduce --engine ray`: the runs of one or more results folders as Ray tasks.

The driver does what `reproduce.reproduce` does before and after training: every check
(outputs, inputs, settings, data) and the precision, per results folder, before any task
starts; data.json and the tables after each unit finishes. A task trains one unit: a row's
unfinished splits as one group where the local grouped trainer batches them
(`reproduce.units`), else a single run; it writes its run directories exactly as the local
engine does, on a filesystem every node reaches. Runs are deterministic, so the tables equal
a local run's; a task that dies is retried by Ray, and an interrupted grid resumes from its
finished run directories.
"""

from __future__ import annotations

import logging

from tqdm import tqdm

from trailers12k_feats.engines import EngineConfig, connect, ray_get
from trailers12k_feats.runtime import PrecisionChoice
from trailers12k_feats.training import reproduce as rep
from trailers12k_feats.training.tables import write_results
from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)


def _train(cfg: rep.ReproduceConfig, row: str, splits: tuple[int, ...], precision: PrecisionChoice,
           threads: int) -> tuple[str, tuple[int, ...]]:
    """A Ray task: train one unit into its run directories (torch on `threads` threads)."""
    import torch

    torch.set_num_threads(threads)
    rep.train_unit(cfg, row, splits, precision, progress=False)
    return row, splits


def reproduce_ray(cfgs: list[rep.ReproduceConfig], engine: EngineConfig, progress: bool = True) -> list[str]:
    """Every unfinished run of the results folders `cfgs` as Ray tasks (`engine.cpus_per_run` CPUs each);
    returns each folder's test table, as `reproduce.reproduce` would."""
    if any(c.train.device != "cpu" for c in cfgs):
        raise T12kError("--engine ray trains on CPUs (--cpus-per-run per task; the heads are small); leave --device "
                        "out, or train on a GPU with the local engine.")
    plans = [rep.prepare(c) for c in cfgs]  # every folder checked before any task starts
    work = [(i, row, splits) for i, (c, p) in enumerate(zip(cfgs, plans)) for row, splits in rep.units(c, p.todo, True)]
    if work:
        ray = connect(engine)
        task = ray.remote(_train).options(num_cpus=engine.cpus_per_run, max_retries=engine.max_retries)
        threads = max(1, int(engine.cpus_per_run))
        pending = {task.remote(cfgs[i], row, splits, plans[i].precision, threads): (i, row) for i, row, splits in work}
        bar = tqdm(total=sum(len(s) for _, _, s in work), unit="run", desc="reproduce (ray)", disable=not progress,
                   dynamic_ncols=True)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                i, row = pending.pop(ready[0])
                _, splits = ray_get(ray, ready[0])
                rep.record_finished(cfgs[i], plans[i], row)
                bar.update(len(splits))
        finally:
            bar.close()
            for ref in pending:  # Ctrl-C or a failed run: no task goes on writing behind our back
                ray.cancel(ref, force=True)
    return [write_results(c.out_dir, c.protocol) for c in cfgs]

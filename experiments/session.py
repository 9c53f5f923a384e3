"""One run in its workdir, from taking the lock to the exit status.

The lock is taken before anything is written (process 0 takes it; on several
hosts the others wait for its decision); the old run is cleared if asked, the
config saved, the run trained; every way a run can end becomes an exit
status: 0 done, 1 an error during the run (diverged, a pruned weight moved,
no checkpoint restores, processes disagree on the masks, a damaged record
of a streamed dataset), 2 refused (locked workdir, collapsing masks), 128 +
signal when stopped by a signal after saving (or during long pruning, before
there is anything to save).

Each of these ends in one ``error:`` line naming the cause (``experiments.faults``):
a full disk, at start or mid-run, names the workdir and the cause and exits 1,
leaving the workdir rerunnable (the checkpoints saved before survive); any other
unexpected exception is one line too, its traceback in ``<workdir>/errors.log``
(and on the console with ``GRASP_JAX_DEBUG=1``).
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np

from grasp_jax.data import DatasetInfo

from experiments import checkpointing, distributed, faults, paths, train
from experiments import workdir as workdirs
from experiments.config_schema import Config
from experiments.logging_utils import log
from experiments.signals import Stopped, StopSignals
from experiments.steps import SparsityDriftError

REFUSED, FAILED = 2, 1


def _error(message: str, e: Optional[BaseException] = None,
           workdir: Optional[str] = None) -> None:
    import jax

    where = f" (process {jax.process_index()})" if jax.process_count() > 1 else ""
    faults.report(message, e, workdir, process=where)


def _unexpected(e: BaseException, workdir: str, at_start: bool = False) -> None:
    """One line for an exception nothing else names: a full disk, or its type and message."""
    if faults.is_disk_full(e):
        kept = ("nothing was written" if at_start else
                "the checkpoints saved before are intact")
        _error(f"no space left on the device of {paths.absolute(workdir)}; {kept}: free some "
               "space and rerun the same command", e, workdir)
    else:
        _error(f"the run in {paths.absolute(workdir)} failed: {faults.describe(e)}", e, workdir)


def _agree(status: int) -> int:
    """Process 0's status, on every process (a collective on several processes)."""
    import jax

    if jax.process_count() == 1:
        return status
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(status)))


def _sync(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run(config: Config, workdir: str, info: DatasetInfo, *, overwrite: bool = False,
        allow_layer_collapse: bool = False,
        allow_topology_change: bool = False) -> tuple[int, dict]:
    """Train ``config`` in ``workdir``; (exit status, results). ``info`` is the config's
    dataset's, made once for the checks of its flags (``run_config.checked_config``)."""
    import jax

    main = jax.process_index() == 0
    lock = workdirs.Lock(workdir)
    status = 0
    if main:
        try:
            lock.acquire()
            if lock.took_over:
                log(lock.took_over)
            for name in paths.remove_stale_temporaries(workdir):
                log(f"removed {paths.join(workdir, name)}, left by a write that was killed")
        except workdirs.LockHeld as e:
            _error(str(e))
            status = REFUSED
        except OSError as e:  # a full disk or a vanished mount before anything is written
            lock.discard_workdir_if_created()
            _unexpected(e, workdir, at_start=True)
            status = FAILED
    status = _agree(status)
    if status:
        return status, {}
    try:
        fresh = overwrite or not paths.isdir(paths.join(workdir, "checkpoints"))
        if main:
            workdirs.prepare(workdir, config, overwrite)
        _sync("prepare_workdir")  # the others wait until process 0 has set the workdir up
        log(f"workdir {paths.absolute(workdir)}")
        log("config " + json.dumps(config.to_dict(), sort_keys=True))
        with StopSignals() as signals, faults.library_reports_to_log(workdir):
            results = train.train_and_evaluate(config, workdir, info, allow_layer_collapse, signals,
                                               *([True] if allow_topology_change else []))
    except Stopped as e:
        log(f"{signals.name} while pruning ({e}): nothing is saved before the first step; "
            "rerun the same command to prune again")
        return signals.exit_status, {}
    except train.LayerCollapseError as e:
        _error(str(e))
        if main and fresh:  # nothing of this refused run stays behind
            workdirs.clear_run(workdir)
            lock.discard_workdir_if_created()
        return REFUSED, {}
    except train.TopologyChanged as e:
        _error(str(e))
        return REFUSED, {}
    except (SparsityDriftError, distributed.MaskMismatchError,
            checkpointing.NoUsableCheckpoint) as e:
        _error(str(e), e, workdir)
        return FAILED, {}
    except Exception as e:
        # A damaged record of a streamed split (too large to verify at start) is met
        # mid-run; TF's error names only an offset, so name the file and the fix.
        from grasp_jax.data import integrity

        if integrity.is_data_loss(e):
            _error(integrity.damaged_record_message(e, info, config.data_dir), e, workdir)
        else:
            _unexpected(e, workdir)
        return FAILED, {}
    finally:
        if main:
            lock.release()
    _sync("run_finished")  # leave together: process 0 writes the reports last
    if results["status"] == "diverged":
        return FAILED, results
    return (signals.exit_status if results["status"] == "stopped" else 0), results

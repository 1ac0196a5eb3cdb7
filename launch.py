"""Starting the processes of a multi-process run: one per GPU (NCCL), or CPU processes (gloo).

Used by ``main_multi_gpu.py`` and ``eval_knn.py -ngpus``, which also run under
``python -m paddle.distributed.launch`` (several machines). Each process calls
``paddle.distributed.init_parallel_env()`` first; ``utils.get_rank`` / ``get_world_size`` then
tell it its place.
"""
import os
import signal
import sys
import threading
import time

import paddle.distributed as dist

from config import ConfigError

CPU_PROCESSES = 2  # default process count without a GPU
PARENT_POLL_SECONDS = 1.0  # how often a started process checks that the one that started it is there
INTERRUPT_GRACE_SECONDS = 10  # how long interrupted processes have to end before they are killed


def started_by_paddle_launch():
    """Whether ``python -m paddle.distributed.launch`` started this process (it starts them itself,
    each on the GPU it chose for it; each then runs its worker directly). The launcher sets
    PADDLE_TRAINERS_NUM in every process it starts, also when it starts a single one (e.g.
    ``--gpus 3``), which must then run on that GPU, not start processes on every visible GPU."""
    return 'PADDLE_TRAINERS_NUM' in os.environ


def check_launched_processes(requested, name):
    """Under ``paddle.distributed.launch``, which decides the number of processes itself (over all
    machines): raises ``ConfigError`` when ``requested`` (the setting ``name``; -1 leaves it to
    the launcher) asks for another number, which would be ignored."""
    launched = int(os.environ['PADDLE_TRAINERS_NUM'])
    if requested != -1 and requested != launched:
        raise ConfigError(f'{name} asks for {requested} processes, but paddle.distributed.launch runs '
                          f'{launched}: leave it at -1 and choose the processes with the launcher\'s '
                          f'--gpus or --nproc_per_node')


def num_processes(requested, gpus, name):
    """How many processes to start: ``requested``, or when -1 one per GPU (``gpus`` of them, the
    GPUs the processes will use), else ``CPU_PROCESSES``. ``name`` is the setting, for errors."""
    if requested == 0 or requested < -1:
        raise ConfigError(f'{name} must be -1 or positive, got {requested}')
    count = requested if requested > 0 else (gpus or CPU_PROCESSES)
    if gpus and count > gpus:
        raise ConfigError(f'{name} asks for {count} processes but only {gpus} GPUs are visible')
    return count


def run_job(job, arg, requested, gpus, setting, check_inputs):
    """Runs ``job(arg)`` as a multi-process entry point does; returns its result when it ran in this
    process alone, else None. ``job`` is a module-level function (started processes import it).

    Under ``paddle.distributed.launch`` this process is one of the launcher's and runs its part
    here (``requested``, the setting ``setting``, must be -1 or the launcher's count). Otherwise
    ``num_processes(requested, gpus, setting)`` decide: one runs here; several run in new processes
    (``spawn``), after ``check_inputs(arg)`` here, as each of them would report the same error.
    """
    if started_by_paddle_launch():
        check_launched_processes(requested, setting)
        return _in_process_group(job, arg)
    nprocs = num_processes(requested, gpus, setting)
    if nprocs == 1:
        return job(arg)
    check_inputs(arg)
    spawn(_in_process_group, (job, arg), nprocs, on_gpus=bool(gpus))
    return None


def _in_process_group(job, arg):
    """``job(arg)`` in one process of a group, once the group is set up."""
    dist.init_parallel_env()
    return job(arg)


def _exit_when_orphaned(parent_pid):
    """Ends this process (exit status 1) within ``PARENT_POLL_SECONDS`` of the process that started
    it, ``parent_pid``, ending: killed, or stopped by a job scheduler's SIGTERM, it cannot stop its
    workers, which would go on training and writing to the output folder (beside a relaunched
    run), wait forever in a collective call, or (data loading processes) on their queue."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    print(f'error: the process that started this one ({parent_pid}) has ended; stopping',
          file=sys.stderr, flush=True)
    os._exit(1)


def end_with_parent(parent_pid):
    """Makes this process end within ``PARENT_POLL_SECONDS`` of ``parent_pid`` ending (a thread
    running ``_exit_when_orphaned``). For processes started by another one: a run's workers,
    data loading processes."""
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _run_worker(parent_pid, worker, *args):
    """Body of a started process: ``worker(*args)``, ended early if ``parent_pid`` ends. Its result
    is dropped: Paddle would send it back through a pipe that nothing reads here, and a result
    larger than the pipe's buffer kept the process waiting for ever."""
    end_with_parent(parent_pid)
    worker(*args)


def spawn(worker, args, nprocs, on_gpus):
    """Runs ``worker(*args)`` in ``nprocs`` new processes (NCCL between GPUs, else gloo) and waits
    for them. A failing process has printed its reason; this adds one error line and exits with 1.
    Interrupted (SIGINT, e.g. Ctrl-C), this stops the processes and exits with 130. They end by
    themselves when this one ends before them (``_exit_when_orphaned``)."""
    backend = 'nccl' if on_gpus else 'gloo'
    print(f'starting {nprocs} processes ({backend})', flush=True)
    context = dist.spawn(_run_worker, args=(os.getpid(), worker, *args), nprocs=nprocs, backend=backend,
                         join=False)
    try:
        while not context.join():
            pass
    except KeyboardInterrupt:
        _interrupt(context.processes)
        print('error: interrupted; the worker processes were stopped', file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:  # join re-raises a worker's failure; the worker printed the reason
        print(f'error: a worker process failed: {str(e).strip().splitlines()[-1]}', file=sys.stderr, flush=True)
        sys.exit(1)


def _interrupt(processes):
    """Sends SIGINT to the ``processes`` still running, as Ctrl-C in their terminal would (only this
    one may have had it), and kills those that have not ended ``INTERRUPT_GRACE_SECONDS`` later."""
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()

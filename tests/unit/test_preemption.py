"""preemption.StopSignals at world size 1: a signal only records its number, agreed() reads it (no collective
without a multi-rank world), the previous handlers come back, and disabled it installs nothing."""

import os
import signal

import pytest

from megatron_sapo.preemption import EXIT_CODE, SIGNALS, Preempted, StopSignals


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_sets_the_flag_and_the_previous_handler_returns(signum):
    seen = []
    previous = signal.signal(signum, lambda s, f: seen.append(s))
    try:
        with StopSignals() as signals:
            assert signals.agreed() == 0
            os.kill(os.getpid(), signum)  # the handler runs before the next bytecode of this thread
            assert signals.received == signum and signals.agreed() == signum
            assert seen == []  # only recorded: the previous handler is not called meanwhile
        os.kill(os.getpid(), signum)
        assert seen == [signum]  # restored on exit
    finally:
        signal.signal(signum, previous)


def test_disabled_installs_nothing():
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    with StopSignals(enabled=False) as signals:
        assert {sig: signal.getsignal(sig) for sig in SIGNALS} == before
        assert signals.agreed() == 0


def test_a_default_disposition_is_restored():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        with StopSignals():
            assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_preempted_names_the_signal_the_step_and_the_exit_code():
    err = Preempted(signal.SIGUSR1, 7)
    assert str(err) == "stopped by SIGUSR1 at step 7 (checkpoint complete)"
    assert err.exit_code == EXIT_CODE == 75 and (err.signum, err.step) == (signal.SIGUSR1, 7)


def _agree(rank: int, store_path: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        signals = StopSignals(enabled=False)
        first = signals.agreed()  # nobody signalled
        signals.received = signal.SIGUSR1 if rank == 1 else 0  # only rank 1 got it
        results.put((rank, first, signals.agreed()))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_every_rank_agrees_on_a_signal_one_rank_received(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(r, str(tmp_path / "store"), results)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == [(0, 0, signal.SIGUSR1), (1, 0, signal.SIGUSR1)]

"""coordinator.progress on a fake clock: which rank is the straggler, which stopped first, the
heatmap's cells, and the bounds on what a job's reports may cost."""

from __future__ import annotations

from gpudeck.coordinator.progress import BUCKET, MAX_RANKS, WINDOW, ProgressBook
from gpudeck.protocol.payloads import HangView, ProgressView


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def node_of(rank: int) -> str:
    return f"node-{'abcdefgh'[rank]}"


def view_of(book: ProgressBook) -> ProgressView:
    view = book.view(7, node_of)
    assert view is not None
    return view


def hang_of(book: ProgressBook) -> HangView:
    hung = view_of(book).hung
    assert hung is not None
    return hung


def counts(ops: int, wait_s: float, span_s: float, inside: bool = False) -> dict[str, int]:
    return {"entered": ops + inside, "ops": ops, "wait_us": int(wait_s * 1e6), "span_us": int(span_s * 1e6)}


def run(book: ProgressBook, clock: Clock, own: dict[int, float], seconds: int, step: float = 0.5) -> None:
    """Every rank completes a collective per `step` seconds and spends `own[rank]` of it on its own
    work, the rest waiting (a synchronous job: the slowest rank sets the pace)."""
    for tick in range(1, seconds + 1):
        clock.now += 1
        ops = int(tick / step)
        book.record(7, 1, {rank: counts(ops, ops * (step - mine), ops * step) for rank, mine in own.items()})


def test_the_rank_the_others_wait_for_is_named_with_its_ratio_to_the_median():
    clock = Clock()
    book = ProgressBook(60, clock)
    run(book, clock, {0: 0.1, 1: 0.1, 2: 0.18, 3: 0.11}, 20)
    assert view_of(book).straggler == "rank 2 on node-c is 1.8× slower than the median"


def test_ranks_of_equal_pace_have_no_straggler():
    clock = Clock()
    book = ProgressBook(60, clock)
    run(book, clock, {0: 0.1, 1: 0.11, 2: 0.1}, 20)
    assert view_of(book).straggler == ""


def test_a_rank_stopped_in_its_own_code_is_named_hung_first_once_hang_after_passed():
    clock = Clock()
    book = ProgressBook(30, clock)
    run(book, clock, {0: 0.1, 1: 0.1}, 10)
    stuck = {0: counts(20, 1, 10, inside=True), 1: counts(20, 1, 10)}  # rank 0 waits inside the next one
    for _ in range(29):
        clock.now += 1
        book.record(7, 1, stuck)
    assert view_of(book).hung is None
    clock.now += 1
    book.record(7, 1, stuck)
    hung = hang_of(book)
    assert (hung.rank, hung.node) == (1, "node-b") and "rank 1 on node-b stopped first" in hung.sentence
    assert book.stalled_for(7) == 30


def test_when_every_rank_waits_inside_a_collective_the_longest_stalled_is_named():
    clock = Clock()
    book = ProgressBook(5, clock)
    book.record(7, 1, {0: counts(3, 0, 1), 1: counts(3, 0, 1)})
    clock.now += 1
    book.record(7, 1, {0: counts(4, 0, 2, inside=True), 1: counts(3, 0, 1, inside=True)})
    clock.now += 10
    hung = hang_of(book)
    assert hung.rank == 1 and "every rank waits inside one" in hung.sentence


def test_a_job_that_never_completed_a_collective_is_not_judged():
    clock = Clock()
    book = ProgressBook(5, clock)
    book.record(7, 1, {0: counts(0, 0, 0, inside=True)})
    clock.now += 100
    assert view_of(book).hung is None and book.stalled_for(7) is None


def test_the_heatmap_holds_the_share_of_each_interval_spent_waiting():
    clock = Clock()
    book = ProgressBook(60, clock)
    run(book, clock, {0: 0.1, 1: 0.4}, int(3 * BUCKET))
    wait = view_of(book).wait
    assert len(wait["0"]) == int(WINDOW // BUCKET)
    assert wait["0"][:-3] == [None] * (len(wait["0"]) - 3)  # no report covers those minutes
    assert (all(cell is not None and abs(cell - 0.8) < 0.05 for cell in wait["0"][-2:])
            and all(cell is not None and abs(cell - 0.2) < 0.05 for cell in wait["1"][-2:]))


def test_a_new_attempt_starts_clean_and_stale_reports_and_extra_ranks_are_dropped():
    clock = Clock()
    book = ProgressBook(60, clock)
    run(book, clock, {0: 0.1, 1: 0.3}, 10)
    book.record(7, 1, {0: counts(1, 0, 1)})  # older than what rank 0 reported: ignored
    assert view_of(book).straggler.startswith("rank 1")
    book.record(7, 2, {0: counts(1, 0, 1)})
    assert set(view_of(book).wait) == {"0"} and view_of(book).straggler == ""
    book.record(7, 2, {rank: counts(1, 0, 1) for rank in range(MAX_RANKS + 10)})
    assert len(view_of(book).wait) == MAX_RANKS
    book.keep_only(set())
    assert book.view(7, node_of) is None

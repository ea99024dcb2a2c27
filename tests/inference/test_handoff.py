"""The hand-off of streamed text from the batching thread to its readers: the web server's
event loop, and paced reading threads."""
import asyncio
import threading
import time

from inference import handoff


def run_loop(main) -> None:
    """asyncio.run(main()) in a thread of its own (other tests' browser drivers may leave an
    event loop running in this one)."""
    errors = []

    def target():
        try:
            asyncio.run(main())
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the event loop did not finish"
    if errors:
        raise errors[0]


def test_one_step_wakes_the_loop_once_for_every_answer_it_feeds():
    async def main():
        loop = asyncio.get_running_loop()
        pump = handoff.LoopPump(loop)
        queues = [asyncio.Queue() for _ in range(8)]
        calls = []
        deliver = pump._deliver
        pump._deliver = lambda: (calls.append(1), deliver())

        def step():  # as BatchScheduler._step hands out one token per running answer
            with handoff.one_wakeup_per_loop():
                for i, q in enumerate(queues):
                    pump.put(q, f"token {i}")

        threading.Thread(target=step).start()
        first = await asyncio.wait_for(queues[0].get(), 10)
        # every other answer's token came in the same delivery
        assert first == "token 0" and [q.qsize() for q in queues[1:]] == [1] * 7
        assert calls == [1]

    run_loop(main)


def test_paced_text_comes_at_most_once_per_interval_but_first_piece_and_end_at_once():
    async def main():
        pump = handoff.LoopPump(asyncio.get_running_loop(), interval_s=5.0)
        q: asyncio.Queue = asyncio.Queue()
        started = time.monotonic()

        def answer():
            pump.put(q, "first", urgent=True)
            for i in range(5):
                time.sleep(0.02)
                pump.put(q, f"piece {i}")
            pump.put(q, None, urgent=True)  # the end

        threading.Thread(target=answer).start()
        batches = []
        while not batches or batches[-1][-1] is not None:
            batch = [await asyncio.wait_for(q.get(), 10)]
            while not q.empty():
                batch.append(q.get_nowait())
            batches.append(batch)
        # the pieces between waited for the next delivery, which the end brought at once
        assert batches == [["first"], [f"piece {i}" for i in range(5)] + [None]]
        assert time.monotonic() - started < 4.0  # not held for the 5 s interval

    run_loop(main)


def test_a_closed_loop_is_not_an_error_for_the_decoding_thread():
    loop = asyncio.new_event_loop()
    pump = handoff.LoopPump(loop)
    loop.close()
    pump.put(asyncio.Queue(), "late piece")  # the reader is gone: dropped quietly


def test_a_paced_reading_thread_gets_the_tokens_in_few_pieces_and_all_of_them():
    from inference.batching import Request, Sampling, read_stream

    request = Request(tokens=[1], sampling=Sampling(0.0, 1.0, 0, 1.0), max_tokens=100)

    def decode():  # the first token, a pause, then a token every 5 ms, then the end
        time.sleep(0.05)  # the reader is waiting by now
        for i in range(40):
            request.emit(f"{i} ")
            time.sleep(0.1 if i == 0 else 0.005)
        request.emit(None)

    threading.Thread(target=decode).start()
    started = time.monotonic()
    pieces = list(read_stream(request, timeout_s=10, interval_s=0.1))
    took_s = time.monotonic() - started
    assert "".join(pieces) == "".join(f"{i} " for i in range(40))
    assert pieces[0] == "0 "  # the first at once
    # one piece per 0.1 s of tokens (~0.3 s here, longer on a loaded machine), not 40 wake-ups
    assert len(pieces) <= 2 + took_s / 0.1 and len(pieces) < 40


def test_the_interval_stretches_with_the_answers_a_delivery_feeds():
    """Four answers or fewer: one delivery per interval; eight: one per two intervals, so the
    chunks per second stay bounded. (Timers never fire early, so the lower bounds are exact;
    the upper one leaves a loaded machine 0.9 s.)"""
    async def main():
        pump = handoff.LoopPump(asyncio.get_running_loop(), interval_s=1.0)
        gaps = {}
        for answers in (2, 8):
            queues = [asyncio.Queue() for _ in range(answers)]
            with handoff.one_wakeup_per_loop():
                for q in queues:
                    pump.put(q, "first", urgent=True)
            await asyncio.wait_for(queues[-1].get(), 10)
            started = time.monotonic()
            for q in queues:
                pump.put(q, "piece")
            await asyncio.wait_for(queues[-1].get(), 10)
            gaps[answers] = time.monotonic() - started
            for q in queues:
                pump.put(q, None, urgent=True)  # the ends: the next test starts unpaced
                while (await q.get()) is not None:
                    pass
        assert 0.9 <= gaps[2] < 1.9 and gaps[8] >= 1.95

    run_loop(main)

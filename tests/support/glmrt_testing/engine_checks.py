"""Driving an LLMEngine step by step in tests, and checking that it holds nothing afterwards."""


def run_until_done(engine) -> dict:
    """Step until nothing is left -> request id: its final output."""
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def assert_all_free(engine):
    """No request, KV block, image embedding or device row is held."""
    bm = engine.block_manager
    assert not engine.has_unfinished() and not engine.request_ids
    assert bm.num_free_blocks == bm.num_blocks and all(c == 0 for c in bm.ref_counts)
    assert not engine.runner.image_cache
    assert not engine.runner.batch.active.any() and not engine.runner.batch.context_lens.any()

from colo_proxy.disk.gate import CommitGate


def test_release_needs_both_in_either_order() -> None:
    g = CommitGate()
    assert g.memory_done(1) is None
    assert g.disk_acked(1) == 1
    assert g.disk_acked(2) is None
    assert g.disk_acked(3) is None
    assert g.memory_done(2) == 2
    assert g.memory_done(3) == 3
    assert g.memory_done(3) is None
    assert g.released_epoch == 3

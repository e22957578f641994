"""control/transitions.py: the policy node's transition records and the learner's assembly of them (numpy only).

Over DDS with the real node and learner: tests/test_hil_ros.py."""

import math

import numpy as np

from s2r.control.transitions import TransitionAssembler, TransitionLayout, header

LAYOUT = TransitionLayout(obs_dim=2, action_dim=1, spec_hash="abc123")


class Node:
    """Writes records as the policy node does: one sequence per session."""

    def __init__(self, session: float):
        self.session, self.seq = session, 0

    def tick(self, episode: int, step: int, intervened: bool = False) -> np.ndarray:
        self.seq += 1
        return LAYOUT.tick(np.zeros(LAYOUT.size), self.session, self.seq, 0.0, episode, step, intervened,
                           "joy" if intervened else "policy", np.array([step, -step]), np.array([0.5]),
                           np.array([-0.5 if intervened else 0.5]))

    def end(self, episode: int, step: int, success) -> np.ndarray:
        self.seq += 1
        return LAYOUT.episode_end(np.zeros(LAYOUT.size), self.session, self.seq, 0.0, episode, step, success)


def test_a_record_names_its_fields_and_the_label_its_spec():
    r = Node(7.0).tick(3, 11, intervened=True)
    assert r.shape == (9 + 2 + 2,) and LAYOUT.label == "s2r_transition/1 spec=abc123"
    h = header(r)
    assert (h["kind"], h["session"], h["seq"], h["episode"], h["step"], h["intervened"], h["source"]) == \
        (0, 7.0, 1, 3, 11, 1, 1) and math.isnan(h["label"])
    f = LAYOUT.fields()
    assert r[slice(f["obs"][0], sum(f["obs"]))].tolist() == [11, -11]
    assert LAYOUT.check(LAYOUT.label, LAYOUT.size) is None
    assert LAYOUT.check("s2r_transition/1 spec=other", LAYOUT.size).startswith("spec:")
    assert LAYOUT.check("something/2", LAYOUT.size).startswith("format:")
    assert LAYOUT.check(LAYOUT.label, 5).startswith("size:")


def test_consecutive_ticks_link_an_ended_episode_is_terminal_and_gaps_break_the_chain():
    a, b = Node(1.0), Node(2.0)
    records = [a.tick(1, 1), a.tick(1, 2, intervened=True), a.tick(1, 3), a.end(1, 3, True),  # 3 rows, last done
               a.tick(2, 4)]
    a.seq += 1  # one record lost in transport (tick 5)
    records += [a.tick(2, 6), a.tick(2, 7), a.end(2, 7, None),  # 4 -> (5 lost): unlinked; 6 -> 7; 7 done
                b.tick(1, 1), b.tick(1, 2)]  # the node restarted: nothing links across; b's last tick waits
    asm = TransitionAssembler(LAYOUT)
    rows = asm.feed(records[:4]), asm.feed(records[4:])  # (in two deliveries)
    obs = np.concatenate([r.obs for r in rows])
    assert obs[:, 0].tolist() == [1, 2, 3, 6, 7, 1]
    assert np.concatenate([r.next_obs for r in rows])[:, 0].tolist() == [2, 3, 3, 7, 7, 2]
    assert np.concatenate([r.final for r in rows]).tolist() == [False, False, True, False, True, False]
    success = np.concatenate([r.success for r in rows])
    assert success[2] == 1.0 and np.isnan(success[[0, 1, 3, 4, 5]]).all()
    assert np.concatenate([r.intervened for r in rows]).tolist() == [False, True, False, False, False, False]
    assert np.concatenate([r.action for r in rows])[:, 0].tolist() == [0.5, -0.5, 0.5, 0.5, 0.5, 0.5]
    assert (asm.lost, asm.unlinked, asm.sessions) == (1, 1, 2)
    assert asm.episodes == {"success": 1, "failure": 0, "unlabelled": 1}

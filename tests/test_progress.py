"""Progress bars: quiet is scoped, never left on after the block."""

from __future__ import annotations

from lotus_deploy.progress import bar, is_quiet, quiet


def test_quiet_is_restored_after_the_block():
    assert not is_quiet()
    with quiet():
        assert is_quiet() and bar(range(3)).disable
        with quiet(False):
            assert not is_quiet()
        assert is_quiet()
    assert not is_quiet()


def test_quiet_is_restored_after_an_error():
    try:
        with quiet():
            raise ValueError
    except ValueError:
        pass
    assert not is_quiet()

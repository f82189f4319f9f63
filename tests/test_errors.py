"""Errors a user can mend end as one line: the command line's `error: ...`, a notebook cell's SystemExit."""
from __future__ import annotations

import pytest

from helpers.annotations import DatasetError
from helpers.errors import USER_ERRORS, one_line_errors
from helpers.schedule import ScheduleMismatch
from helpers.storage import StorageFull
from helpers.weights import BundleError, CheckpointError


@pytest.mark.parametrize("error", [DatasetError, CheckpointError, ScheduleMismatch, StorageFull])
def test_each_mendable_error_stops_a_cell_with_its_message_alone(error):
    assert error in USER_ERRORS
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        raise error("the folder x: what to do")
    assert str(stopped.value) == "the folder x: what to do" and stopped.value.__cause__ is None
    assert stopped.value.__suppress_context__


def test_a_cell_names_the_further_errors_it_can_mend_and_a_bug_keeps_its_traceback():
    with pytest.raises(SystemExit, match="bad bundle"), one_line_errors(BundleError):
        raise BundleError("bad bundle")
    with pytest.raises(KeyError), one_line_errors(BundleError):
        raise KeyError("a bug")

"""The wait queue counts a request once per choice (prompts x n engine sequences), and admits one
however many choices it brings while the queue is not full."""

from __future__ import annotations

import pytest

from lora_serve.api.admission import Admission
from lora_serve.api.errors import APIError


def test_a_request_counts_once_per_choice() -> None:
    admission = Admission(max_queue=4, retry_after_s=1, timeout_s=None)
    with admission.admit(num_running=0, num_seqs=4):
        with pytest.raises(APIError) as info, admission.admit(num_running=0):
            pass
        assert info.value.status == 429 and info.value.code == "queue_full"
        with admission.admit(num_running=4):  # its four choices run: none of them waits
            assert admission.num_in_flight == 5
    assert admission.num_in_flight == 0


def test_a_request_with_more_choices_than_the_queue_holds_is_admitted_into_an_empty_queue() -> None:
    admission = Admission(max_queue=2, retry_after_s=1, timeout_s=None)
    with admission.admit(num_running=0, num_seqs=16):
        assert admission.num_in_flight == 16

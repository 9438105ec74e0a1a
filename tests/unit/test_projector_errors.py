"""Which failures the projector waits out (outages) and which are a record's (dead
letters): projections.projector.is_transient."""

from __future__ import annotations

import asyncpg
import redis.exceptions
from aiokafka.errors import KafkaConnectionError

from projections.projector import is_transient


def test_outages_and_data_errors_are_told_apart() -> None:
    assert is_transient(asyncpg.exceptions.AdminShutdownError("terminating connection"))
    assert is_transient(asyncpg.exceptions.ConnectionDoesNotExistError("closed"))
    assert is_transient(asyncpg.exceptions.CannotConnectNowError("starting up"))
    assert is_transient(asyncpg.InterfaceError("connection is closed"))
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(asyncpg.exceptions.UntranslatableCharacterError("\\u0000"))
    assert not is_transient(asyncpg.exceptions.NumericValueOutOfRangeError("int4"))
    assert not is_transient(asyncpg.exceptions.DataError("value out of int64 range"))
    assert not is_transient(asyncpg.exceptions._base.DataError("cannot encode"))
    assert not is_transient(OverflowError())
    assert not is_transient(ValueError())
    assert is_transient(redis.exceptions.ConnectionError("refused"))
    assert is_transient(KafkaConnectionError())
    assert is_transient(asyncpg.exceptions.DeadlockDetectedError("deadlock"))
    assert not is_transient(asyncpg.exceptions.CharacterNotInRepertoireError("0x00"))
    assert not is_transient(asyncpg.exceptions.InvalidTextRepresentationError("bad"))

"""UserService over a real channel: the happy path and every kind of bad input (SPEC §2, §3, §7)."""

from __future__ import annotations

import time

import grpc
import jwt
import pytest

from protos import nodepool_pb2 as pb
from tests.harness import PASSWORD, PoolHarness, bearer, unique_name


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code()


def test_register_login_balance_transfer(pool: PoolHarness) -> None:
    alice, bob = unique_name("alice"), unique_name("bob")
    assert pool.users.Register(pb.RegisterRequest(username=alice, password=PASSWORD)).success
    assert pool.users.Register(pb.RegisterRequest(username=bob, password=PASSWORD)).success
    token = pool.login(alice)

    by_metadata = pool.users.GetBalance(pb.GetBalanceRequest(username=alice), metadata=bearer(token))
    by_field = pool.users.GetBalance(pb.GetBalanceRequest(username=alice, token=token))
    assert by_metadata.success and by_field.success
    assert by_metadata.balance == by_field.balance == 1000

    sent = pool.users.Transfer(pb.TransferRequest(receiver_username=bob, amount=250), metadata=bearer(token))
    assert sent.success, sent.message
    assert pool.balance(token) == 750
    assert pool.balance(pool.login(bob)) == 1250


def test_transfer_with_token_field_only(pool: PoolHarness) -> None:
    (_, token), (bob, _) = pool.new_user(), pool.new_user()
    assert pool.users.Transfer(pb.TransferRequest(token=token, receiver_username=bob, amount=1)).success
    assert pool.balance(token) == 999


@pytest.mark.parametrize(
    "username",
    ["", "ab", "x" * 33, "bad name", "héllo", "名前名前", "a/b", "../etc", "null\x00byte", "semi;colon"],
)
def test_register_rejects_malformed_usernames(sqlite_pool: PoolHarness, username: str) -> None:
    request = pb.RegisterRequest(username=username, password=PASSWORD)
    assert code_of(sqlite_pool.users.Register, request) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("password", ["", "short", "1234567", "p" * 73])
def test_register_rejects_bad_passwords(sqlite_pool: PoolHarness, password: str) -> None:
    request = pb.RegisterRequest(username=unique_name(), password=password)
    assert code_of(sqlite_pool.users.Register, request) == grpc.StatusCode.INVALID_ARGUMENT


def test_register_accepts_boundary_lengths(sqlite_pool: PoolHarness) -> None:
    for name in ("abc", "a" * 22 + unique_name("")):  # 3 and 32 characters
        assert sqlite_pool.users.Register(pb.RegisterRequest(username=name, password="8chars!!")).success


def test_duplicate_username_is_refused_in_band_whatever_the_case(pool: PoolHarness) -> None:
    name = pool.register()
    for again in (name, name.upper()):
        reply = pool.users.Register(pb.RegisterRequest(username=again, password=PASSWORD))
        assert not reply.success and "already taken" in reply.message


def test_wrong_password_and_unknown_user_look_the_same(sqlite_pool: PoolHarness) -> None:
    name = sqlite_pool.register()
    wrong = sqlite_pool.users.Login(pb.LoginRequest(username=name, password="not-the-password"))
    unknown = sqlite_pool.users.Login(pb.LoginRequest(username=unique_name(), password=PASSWORD))
    assert not wrong.success and not unknown.success
    assert wrong.message == unknown.message and not wrong.token


def test_empty_login_is_invalid(sqlite_pool: PoolHarness) -> None:
    assert (
        code_of(sqlite_pool.users.Login, pb.LoginRequest(username="", password="")) == grpc.StatusCode.INVALID_ARGUMENT
    )
    name = sqlite_pool.register()
    assert code_of(sqlite_pool.users.Login, pb.LoginRequest(username=name)) == grpc.StatusCode.INVALID_ARGUMENT


def test_repeated_bad_passwords_are_rate_limited(make_pool, sqlite_url: str) -> None:
    pool = make_pool(database_url=sqlite_url, LOGIN_FREE_FAILURES=3, LOGIN_LOCKOUT_AFTER=6)
    name = pool.register()
    for _ in range(3):
        assert not pool.users.Login(pb.LoginRequest(username=name, password="wrong-password")).success
    with pytest.raises(grpc.RpcError) as info:
        pool.users.Login(pb.LoginRequest(username=name, password="wrong-password"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "try again" in info.value.details()
    # While limited, even the right password is not heard: guessing cannot continue.
    assert code_of(pool.users.Login, pb.LoginRequest(username=name, password=PASSWORD)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    # Another user from the same address is not locked out by someone else's failures.
    other = pool.register()
    assert pool.users.Login(pb.LoginRequest(username=other, password=PASSWORD)).success


def test_registrations_per_peer_are_limited(make_pool, sqlite_url: str) -> None:
    pool = make_pool(database_url=sqlite_url, REGISTRATIONS_PER_PEER_PER_MINUTE=3)
    if time.time() % 60 > 55:  # keep all attempts inside one minute window
        time.sleep(60 - time.time() % 60 + 0.1)
    for _ in range(3):
        pool.register()
    request = pb.RegisterRequest(username=unique_name(), password=PASSWORD)
    assert code_of(pool.users.Register, request) == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("amount", "code"),
    [
        (0, grpc.StatusCode.INVALID_ARGUMENT),
        (-5, grpc.StatusCode.INVALID_ARGUMENT),
        (-(2**63), grpc.StatusCode.INVALID_ARGUMENT),
        (2**63 - 1, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_transfer_rejects_bad_amounts(sqlite_pool: PoolHarness, amount: int, code: grpc.StatusCode) -> None:
    (_, token), (bob, _) = sqlite_pool.new_user(), sqlite_pool.new_user()
    request = pb.TransferRequest(receiver_username=bob, amount=amount)
    assert code_of(sqlite_pool.users.Transfer, request, metadata=bearer(token)) == code
    assert sqlite_pool.balance(token) == 1000


def test_transfer_domain_refusals_are_in_band(pool: PoolHarness) -> None:
    (alice, token), (bob, bob_token) = pool.new_user(), pool.new_user()
    too_much = pool.users.Transfer(pb.TransferRequest(receiver_username=bob, amount=1001), metadata=bearer(token))
    assert not too_much.success and "insufficient" in too_much.message
    nobody = pool.users.Transfer(pb.TransferRequest(receiver_username=unique_name(), amount=1), metadata=bearer(token))
    assert not nobody.success and "no user" in nobody.message
    to_self = pool.users.Transfer(pb.TransferRequest(receiver_username=alice.upper(), amount=1), metadata=bearer(token))
    assert not to_self.success and "yourself" in to_self.message
    missing = pb.TransferRequest(amount=1)
    assert code_of(pool.users.Transfer, missing, metadata=bearer(token)) == grpc.StatusCode.INVALID_ARGUMENT
    assert pool.balance(token) == 1000 and pool.balance(bob_token) == 1000


def test_idempotency_key_applies_a_transfer_once(pool: PoolHarness) -> None:
    (_, token), (bob, bob_token) = pool.new_user(), pool.new_user()
    request = pb.TransferRequest(receiver_username=bob, amount=40, idempotency_key="order-17")
    for _ in range(3):
        assert pool.users.Transfer(request, metadata=bearer(token)).success
    assert pool.balance(token) == 960 and pool.balance(bob_token) == 1040
    reused = pool.users.Transfer(
        pb.TransferRequest(receiver_username=bob, amount=41, idempotency_key="order-17"), metadata=bearer(token)
    )
    assert not reused.success and "different transfer" in reused.message
    assert pool.balance(token) == 960 and pool.balance(bob_token) == 1040
    bad_key = pb.TransferRequest(receiver_username=bob, amount=1, idempotency_key="spaces are bad")
    assert code_of(pool.users.Transfer, bad_key, metadata=bearer(token)) == grpc.StatusCode.INVALID_ARGUMENT


def _forged(name: str, secret: str = "not-the-pool-secret-but-long-enough-for-hs256", **claims) -> str:
    now = int(time.time())
    body = {"sub": name, "iat": now, "exp": now + 3600, "iss": "hivemind-node-pool", **claims}
    return jwt.encode(body, secret, algorithm="HS256")


def test_tokens_missing_expired_forged_or_disagreeing(sqlite_pool: PoolHarness) -> None:
    pool = sqlite_pool
    (alice, token), (bob, bob_token) = pool.new_user(), pool.new_user()
    unauth = grpc.StatusCode.UNAUTHENTICATED
    get = pool.users.GetBalance
    assert code_of(get, pb.GetBalanceRequest(username=alice)) == unauth
    assert code_of(get, pb.GetBalanceRequest(), metadata=[("authorization", token)]) == unauth  # no scheme
    assert code_of(get, pb.GetBalanceRequest(), metadata=bearer("garbage")) == unauth
    assert code_of(get, pb.GetBalanceRequest(), metadata=bearer(_forged(alice))) == unauth
    assert code_of(get, pb.GetBalanceRequest(token=_forged(alice))) == unauth
    expired = pool.ctx.tokens.issue(alice, now=time.time() - 10 * 24 * 3600)
    assert code_of(get, pb.GetBalanceRequest(), metadata=bearer(expired)) == unauth
    none_alg = jwt.encode({"sub": alice, "exp": int(time.time()) + 60}, key="", algorithm="none")
    assert code_of(get, pb.GetBalanceRequest(), metadata=bearer(none_alg)) == unauth
    # Token in metadata and token in the message name different users.
    assert code_of(get, pb.GetBalanceRequest(token=bob_token), metadata=bearer(token)) == unauth
    transfer = pb.TransferRequest(token=bob_token, receiver_username=bob, amount=5)
    assert code_of(pool.users.Transfer, transfer, metadata=bearer(token)) == unauth
    assert pool.balance(token) == 1000 and pool.balance(bob_token) == 1000


def test_an_overlong_login_is_invalid(sqlite_pool: PoolHarness) -> None:
    name = sqlite_pool.register()
    for request in [
        pb.LoginRequest(username="u" * 65, password=PASSWORD),
        pb.LoginRequest(username=name, password="p" * 1025),
        pb.LoginRequest(username=name, password="é" * 513),  # 1,026 bytes in 513 characters
    ]:
        assert code_of(sqlite_pool.users.Login, request) == grpc.StatusCode.INVALID_ARGUMENT
    assert sqlite_pool.users.Login(pb.LoginRequest(username=name, password=PASSWORD)).success  # no lockout from them


def test_an_operator_asking_for_a_malformed_or_unknown_users_balance_is_refused(make_pool, database_url: str) -> None:
    pool = make_pool(database_url=database_url, OPERATORS=["opsadmin"])
    pool.register("opsadmin")
    operator = bearer(pool.login("opsadmin"))
    for username in ["nobody-here", "a\x00b", "x" * 10_000, "../etc/passwd", "' OR 1=1 --", "ＡＢＣ"]:
        reply = pool.users.GetBalance(pb.GetBalanceRequest(username=username), metadata=operator)
        assert not reply.success and "no user named" in reply.message, (username[:20], reply)


def test_balance_of_someone_else_is_denied_except_to_operators(make_pool, sqlite_url: str) -> None:
    pool = make_pool(database_url=sqlite_url, OPERATORS=["opsadmin"])
    (alice, token), (bob, _) = pool.new_user(), pool.new_user()
    request = pb.GetBalanceRequest(username=bob)
    assert code_of(pool.users.GetBalance, request, metadata=bearer(token)) == grpc.StatusCode.PERMISSION_DENIED
    pool.register("opsadmin")
    operator = pool.login("opsadmin")
    assert pool.users.GetBalance(request, metadata=bearer(operator)).balance == 1000
    assert pool.users.GetBalance(pb.GetBalanceRequest(username=alice), metadata=bearer(operator)).success

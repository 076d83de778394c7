"""UserService: Register, Login, GetBalance, Transfer."""

from __future__ import annotations

import logging

from api.context import PoolContext
from api.rpc import Call, rpc
from models import accounts
from models.errors import InvalidArgument, PermissionDenied
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

log = logging.getLogger("api.users")


class UserService(pb_grpc.UserServiceServicer):
    def __init__(self, ctx: PoolContext) -> None:
        self.ctx = ctx

    @rpc(pb.RegisterResponse, auth=False)
    def Register(self, request: pb.RegisterRequest, call: Call) -> pb.RegisterResponse:
        accounts.validate_username(request.username)
        accounts.validate_password(request.password)
        self.ctx.limiter.check_registration(call.peer)
        settings = self.ctx.settings
        user = accounts.register(
            self.ctx.db,
            username=request.username,
            password=request.password,
            rounds=settings.BCRYPT_ROUNDS,
            credit=settings.INITIAL_CREDIT_SCORE,
            initial_balance=settings.INITIAL_BALANCE,
        )
        log.info("user %s registered", user.username, extra={"event": "user_registered", "user": user.username})
        return pb.RegisterResponse(
            success=True, message=f"registered {user.username} with {settings.INITIAL_BALANCE} CPT"
        )

    @rpc(pb.LoginResponse, auth=False)
    def Login(self, request: pb.LoginRequest, call: Call) -> pb.LoginResponse:
        if not request.username or not request.password:
            raise InvalidArgument("username and password are required")
        if len(request.username) > 64 or len(request.password.encode()) > 1024:
            raise InvalidArgument("username or password too long")
        limiter = self.ctx.limiter
        limiter.check_login(request.username, call.peer)
        user = accounts.verify_password(self.ctx.db, request.username, request.password)
        if user is None:
            limiter.record_login_failure(request.username, call.peer)
            return pb.LoginResponse(success=False, message="invalid username or password")
        limiter.record_login_success(user.username)
        return pb.LoginResponse(success=True, message="logged in", token=self.ctx.tokens.issue(user.username, user.id))

    @rpc(pb.GetBalanceResponse)
    def GetBalance(self, request: pb.GetBalanceRequest, call: Call) -> pb.GetBalanceResponse:
        caller = call.user
        username = request.username or caller.username
        if username.lower() != caller.username.lower() and not caller.is_operator:
            raise PermissionDenied("you may only read your own balance")
        balance = accounts.balance_of(self.ctx.db, username)
        return pb.GetBalanceResponse(success=True, message=f"{balance} CPT", balance=balance)

    @rpc(pb.TransferResponse)
    def Transfer(self, request: pb.TransferRequest, call: Call) -> pb.TransferResponse:
        if not request.receiver_username:
            raise InvalidArgument("receiver_username is required")
        outcome = accounts.transfer(
            self.ctx.db,
            sender=call.user.username,
            receiver=request.receiver_username,
            amount=request.amount,
            idempotency_key=request.idempotency_key or None,
            max_amount=self.ctx.settings.MAX_TRANSFER_AMOUNT,
        )
        if outcome.replayed:
            return pb.TransferResponse(success=True, message="already applied (same idempotency key)")
        log.info(
            "transfer %s -> %s: %d CPT",
            call.user.username,
            request.receiver_username,
            request.amount,
            extra={"event": "transfer", "entry": outcome.entry_id},
        )
        return pb.TransferResponse(success=True, message=f"sent {request.amount} CPT to {request.receiver_username}")

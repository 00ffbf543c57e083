"""Booking commands into Exchange: policy, rate limit, the idempotency journal and execution (design.md §5)."""

from gateway.commands.policy import Policy, RateLimiter
from gateway.commands.service import CommandService

__all__ = ["CommandService", "Policy", "RateLimiter"]

"""Settings → the Tenant objects the pipeline works with (limits, budgets, allowed tiers)."""

from __future__ import annotations

from routecache.domain import Budget, OperatingPoint, OverCapPolicy, RateLimits, Tenant, Tier
from routecache.router.settings import Settings, TenantSettings


def routing_target(
    tenant: TenantSettings, settings: Settings
) -> tuple[float | None, OperatingPoint | None]:
    """The most specific of: tenant threshold, tenant target, default threshold, default target."""
    if tenant.routing_threshold is not None or tenant.operating_point() is not None:
        return tenant.routing_threshold, tenant.operating_point()
    return settings.classifier.routing_threshold, settings.classifier.operating_point()


def allowed_tiers(tenant: TenantSettings, settings: Settings) -> frozenset[Tier]:
    """The tiers whose first provider's model the tenant may use (all without models_allowed);
    never none: the settings refuse a models_allowed naming neither model when they load."""
    if tenant.models_allowed is None:
        return frozenset(Tier)
    models = {
        Tier.CHEAP: settings.upstream.cheap.model,
        Tier.STRONG: settings.upstream.strong.model,
    }
    return frozenset(t for t, model in models.items() if model in tenant.models_allowed)


def allowed_providers(tenant: TenantSettings, settings: Settings) -> frozenset[str] | None:
    """The names of the providers whose model the tenant may use (None without models_allowed):
    a fallback serving another model is skipped as the tier's first provider would be."""
    if tenant.models_allowed is None:
        return None
    return frozenset(
        name
        for tier in Tier
        for name, provider in settings.upstream.chain(tier.value)
        if provider.model in tenant.models_allowed
    )


def tenant_from_settings(t: TenantSettings, settings: Settings) -> Tenant:
    threshold, point = routing_target(t, settings)
    rate, budget = t.rate, t.budget
    return Tenant(
        name=t.name,
        routing_threshold=threshold,
        similarity_threshold=t.similarity_threshold or settings.cache.similarity_threshold,
        default_ttl_seconds=t.default_ttl_seconds or settings.cache.default_ttl_seconds,
        requests_per_second=t.requests_per_second,
        operating_point=point,
        rate=RateLimits(rate.window_seconds, rate.requests, rate.tokens,
                        rate.user_requests, rate.user_tokens),
        budget=Budget(
            # The older daily_budget_usd applies only where budget.daily_usd is not set.
            daily_usd=budget.daily_usd if budget.daily_usd is not None else t.daily_budget_usd,
            monthly_usd=budget.monthly_usd, soft_daily_usd=budget.soft_daily_usd,
            soft_monthly_usd=budget.soft_monthly_usd, user_daily_usd=budget.user_daily_usd,
            user_monthly_usd=budget.user_monthly_usd, policy=OverCapPolicy(budget.policy),
        ),
        allowed_tiers=allowed_tiers(t, settings),
        providers_allowed=allowed_providers(t, settings),
        max_false_hit_rate=t.max_false_hit_rate or settings.cache.max_false_hit_rate,
    )  # fmt: skip

"""Licence guard: warn when a stated deployment conflicts with a model's licence."""

from __future__ import annotations

from selfhost.catalog import ModelSpec, get_licence


def licence_warnings(model: ModelSpec, monthly_users: float | None = None, commercial: bool = True) -> list[str]:
    """Warnings (possibly none) for serving `model` to `monthly_users` people.

    The licence text decides; these only flag the clauses operators trip over.
    """
    if not model.licence:
        return [f"{model.alias} is not in the catalog, so its licence is unknown here: read its model card "
                "before deploying it."]
    licence = get_licence(model.licence)
    warnings = []
    if monthly_users is not None and licence.max_monthly_users is not None and monthly_users > licence.max_monthly_users:
        warnings.append(
            f"{model.alias} is under the {licence.name}: above {licence.max_monthly_users:,.0f} monthly active users "
            f"(you stated {monthly_users:,.0f}) you must request a separate licence from its publisher ({licence.url})."
        )
    if commercial and not licence.commercial_use:
        warnings.append(f"{model.alias} is under the {licence.name}, which does not allow commercial use ({licence.url}).")
    if licence.use_policy:
        warnings.append(f"{model.alias}: the deployment must follow {licence.name}'s use policy ({licence.use_policy}).")
    return warnings

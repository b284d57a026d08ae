"""Preference rows relabelled for a cost model of some harm categories only (``data.categories``).

A per-category constraint (``lagrange.constraints``) needs a cost model that calls an answer unsafe
when it is harmful *in its categories*, and safe otherwise — also when it is harmful in another one,
which another constraint watches. PKU-SafeRLHF (v1) and the toy world mark each response with
``response_{0,1}_harm_category`` (category name → harmful); from those flags:

- ``is_response_{0,1}_safe`` becomes "harmful in none of the categories";
- ``safer_response_id`` points at the response that is safe in the categories when exactly one is;
  when both are safe in them or both harmful, the row keeps its own order. (Both harmful: the
  annotators' order still ranks the worse harm. Both safe: the row stays so that the cost model sees
  answers harmful elsewhere labelled safe — its sign term is what the constraint reads — while its
  ranking term keeps the annotators' order, a weak signal the sign term outweighs.)

A row without the flags cannot be relabelled and is an error naming the row; so is a category that
no row marks harmful (a misspelt name would otherwise train a cost model that calls everything safe).
"""

from __future__ import annotations

from collections.abc import Sequence

from saferlhf.data.schema import DataError


def relabel_by_categories(rows: Sequence[dict], categories: Sequence[str], source: str, *,
                          check_present: bool = True) -> list[dict]:
    """Copies of ``rows`` whose safety labels speak of ``categories`` only (module docstring).

    ``check_present=False`` allows a category that no row marks harmful (a small held-out split).
    """
    if not categories:
        raise ValueError("relabel_by_categories needs at least one category")
    out, known, harmful = [], set(), set()
    for i, row in enumerate(rows):
        unsafe = []
        for j in (0, 1):
            flags = row.get(f"response_{j}_harm_category")
            if not isinstance(flags, dict):
                raise DataError(f"{source}: row {i}: field 'response_{j}_harm_category' is "
                                f"{'missing' if flags is None else type(flags).__name__}; data.categories "
                                f"{list(categories)} needs each response's harm categories")
            known.update(flags)
            harmful.update(c for c, flag in flags.items() if flag)
            unsafe.append(any(bool(flags.get(c, False)) for c in categories))
        new = dict(row)
        new["is_response_0_safe"], new["is_response_1_safe"] = not unsafe[0], not unsafe[1]
        if unsafe[0] != unsafe[1]:
            new["safer_response_id"] = 1 if unsafe[0] else 0
        out.append(new)
    absent = [c for c in categories if c not in harmful]
    if absent and check_present:
        raise DataError(f"{source}: data.categories {absent}: no row marks a response harmful in "
                        f"{'it' if len(absent) == 1 else 'them'} (categories in the data: {sorted(known)})")
    return out


__all__ = ["relabel_by_categories"]

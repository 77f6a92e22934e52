"""``python -m dpp_surgery.zoo {list,run,table}``: the zoo runner, :mod:`dpp_surgery.tools.zoo`.

The zoo's registry (recipes registered as timm models) is :mod:`dpp_surgery.models`."""

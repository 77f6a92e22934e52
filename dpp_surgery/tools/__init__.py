"""Programs that use the library and measure it: benchmarks (:mod:`.bench`), timm coverage (:mod:`.coverage`), the
demo (:mod:`.demo`), experiments (:mod:`.experiments`) and the zoo runner (:mod:`.zoo`). The library never imports
them; ``python -m dpp_surgery.{bench,demo,experiments,zoo}`` run them."""

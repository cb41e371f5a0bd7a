"""One construct per concern; :mod:`infra.stack` only composes them."""

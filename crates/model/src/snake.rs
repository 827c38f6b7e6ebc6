//! go-snakecase, ported exactly (owned by the warehouse work).

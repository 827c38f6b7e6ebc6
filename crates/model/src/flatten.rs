//! Flattening of nested properties, traits and context into warehouse columns (owned by the warehouse work).

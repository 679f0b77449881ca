"""Moving KV blocks between workers, and the KV block identity router and workers share."""

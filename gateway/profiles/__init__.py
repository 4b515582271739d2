"""Care Connect profile validation: vendored conformance resources, the validator, and
where it is used ($validate, writes, response checks, golden inputs, mapping coverage)."""

-- nvembed_status() shows the model's path and the server's process id: for monitoring roles,
-- not for every role (PUBLIC may execute any new function by default).
REVOKE EXECUTE ON FUNCTION @extschema@.nvembed_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.nvembed_status() TO pg_monitor;

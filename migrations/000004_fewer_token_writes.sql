-- Fewer writes per sign-in (BENCHMARKS.md, issue 12). Every sign-in inserts two token rows, and
-- each paid for five index entries and two foreign-key checks.
--
-- Wait at most a few seconds for the tables: dropping a constraint or an index locks them, and a
-- migration queued behind a long transaction would queue every sign-in behind itself. The api
-- retries a failed migration with backoff.
SET LOCAL lock_timeout = '5s';
-- tokens.user_id no longer references users: every token belongs to a session (family_id) that
-- references its user, and both cascade, so deleting a user still deletes its tokens. Who a token
-- signs in is read through its session (api/src/db), never from this column alone.
ALTER TABLE tokens DROP CONSTRAINT IF EXISTS tokens_user_id_fkey;
-- Rotation looks a pair up inside one family, which tokens_family_id_idx already narrows to a
-- handful of rows.
DROP INDEX IF EXISTS tokens_pair_id_idx;
-- tokens_user_id_idx stays for now: api replicas of the previous release, still running during a
-- rolling deploy, delete a user's tokens by user_id on logout-all. This release goes through the
-- sessions instead, so a later migration can drop it.

//! Lua scripts that depend only on the node holding their keys.
//!
//! Redis keeps a cache of scripts per server, and neither replicates it nor keeps it across a
//! restart. So a replica promoted by a failover, or a restarted server, answers `EVALSHA` with
//! `NOSCRIPT`. The redis crate's `Script` then sends `SCRIPT LOAD`, which its cluster client routes
//! to *every* node in the client's map and counts as failed unless every one answers: one hung
//! node, or one the client still lists after it died, fails every script call on the promoted
//! node, and nothing loads the script there in the meantime.
//!
//! This `Script` falls back to `EVAL` instead, with the script's text, routed by its first key like
//! the `EVALSHA` was: it runs the script and caches it on that one node, so the next `EVALSHA`
//! there works. The API is the redis crate's (`key`, `arg`, `invoke_async`), so callers change
//! only their import.

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisResult, ServerErrorKind, ToRedisArgs};

/// A Lua script and its SHA-1, computed once.
#[derive(Debug, Clone)]
pub struct Script {
    code: String,
    hash: String,
}

impl Script {
    pub fn new(code: &str) -> Self {
        Self {
            code: code.to_owned(),
            hash: redis::Script::new(code).get_hash().to_owned(),
        }
    }

    /// Starts an invocation with its first key.
    pub fn key<T: ToRedisArgs>(&self, key: T) -> ScriptInvocation<'_> {
        let mut invocation = self.prepare_invoke();
        invocation.key(key);
        invocation
    }

    /// Starts an invocation with its first argument (for a script without keys).
    pub fn arg<T: ToRedisArgs>(&self, arg: T) -> ScriptInvocation<'_> {
        let mut invocation = self.prepare_invoke();
        invocation.arg(arg);
        invocation
    }

    /// An invocation with no keys and no arguments yet.
    pub fn prepare_invoke(&self) -> ScriptInvocation<'_> {
        ScriptInvocation {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// A script with its keys (`KEYS[i]`) and arguments (`ARGV[i]`). Its Debug shows only how many:
/// they may be secrets (a code's HMAC, a token).
pub struct ScriptInvocation<'a> {
    script: &'a Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ScriptInvocation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptInvocation")
            .field("hash", &self.script.hash)
            .field("keys", &self.keys.len())
            .field("args", &self.args.len())
            .finish()
    }
}

impl ScriptInvocation<'_> {
    pub fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// `EVALSHA`, and `EVAL` on the same node if that node does not have the script.
    pub async fn invoke_async<T: FromRedisValue>(
        &self,
        connection: &mut impl ConnectionLike,
    ) -> RedisResult<T> {
        match self
            .command("EVALSHA", &self.script.hash)
            .query_async(connection)
            .await
        {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.command("EVAL", &self.script.code)
                    .query_async(connection)
                    .await
            }
            result => result,
        }
    }

    /// `EVALSHA sha1 numkeys key… arg…` or `EVAL script numkeys key… arg…`: the first key is the
    /// fourth word, where the cluster client looks for it to pick the node.
    fn command(&self, name: &str, script: &str) -> Cmd {
        let mut command = redis::cmd(name);
        command
            .arg(script)
            .arg(self.keys.len())
            .arg(&*self.keys)
            .arg(&*self.args);
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_the_one_redis_computes() {
        // SHA-1 of "return 1", as `SCRIPT LOAD "return 1"` prints it.
        let script = Script::new("return 1");
        assert_eq!(script.hash, "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
    }

    #[test]
    fn keys_come_before_arguments_and_are_counted() {
        let script = Script::new("return KEYS[1]");
        let mut invocation = script.key("{phone}:a");
        invocation.key("{phone}:b").arg(7).arg("x");
        let packed = invocation
            .command("EVALSHA", &script.hash)
            .get_packed_command();
        let expected = redis::cmd("EVALSHA")
            .arg(&script.hash)
            .arg(2)
            .arg("{phone}:a")
            .arg("{phone}:b")
            .arg(7)
            .arg("x")
            .get_packed_command();
        assert_eq!(packed, expected);
        let shown = format!("{invocation:?}");
        assert!(!shown.contains("phone"), "{shown}");
    }
}

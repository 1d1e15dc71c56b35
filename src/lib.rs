//! vault_redirect: keeps an application's secrets in Vault or OpenBao KV v2
//! and resolves references to them at query time.

use pgrx::prelude::*;

mod backend;
mod config;
mod configure;
mod declare;
mod deletions;
mod errors;
mod gucs;
mod migrate;
mod pending;
mod progress;
mod query;
mod read;
mod redirect;
mod reference;
mod resolve;
mod rows;
mod servers;
mod status;
mod transparent;
mod unmigrate;
mod vault;

pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/bootstrap.sql", bootstrap);
extension_sql_file!("../sql/finalize.sql", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::register();
    pending::register_callbacks();
    transparent::install();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}

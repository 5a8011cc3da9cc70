//! The `portico` binary: parse the command line and hand over to the library.

use clap::Parser as _;

use portico::cli::{self, Cli, Command};

/// jemalloc keeps allocations of different sizes apart: the many short-lived
/// read buffers of a busy proxy do not leave holes between long-lived cached
/// bodies, as they do in glibc's heap.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Check {
            files,
            deny_warnings,
            format,
        } => cli::check(&files, deny_warnings, format),
        Command::Explain {
            file,
            request,
            headers,
            client_ip,
        } => cli::explain(&file, &request, &headers, client_ip.as_deref()),
        Command::Test { files } => cli::test(&files),
        Command::Run(args) => portico::run::main(args),
        Command::Demo => portico::demo::main(),
    };
    std::process::exit(code);
}

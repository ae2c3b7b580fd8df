//! `lull domain add|list|remove` and `lull cert add|list|rm|reload`: custom domains with their
//! DNS records and certificate status, and operator certificates.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use http::Method;
use serde_json::{Value, json};

use super::{
    ClientArgs, Ctx, Exit, Failure, Outcome, cell, finish, print_json, print_table, segment,
    service_path,
};

#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// Add a custom domain to a service: prints the DNS records to create and what DNS says
    /// now; the certificate is obtained once the records point here (`lull domain list`).
    Add {
        service: String,
        domain: String,
        /// Also www.<domain>.
        #[arg(long)]
        www: bool,
        /// Do not wait for the service's new revision to serve.
        #[arg(long)]
        no_wait: bool,
    },
    /// Every name that wants a certificate, with its status (pending, validating, active,
    /// failed) and the reason.
    #[command(alias = "ls")]
    List {
        /// Only this service's.
        service: Option<String>,
    },
    /// Remove a custom domain (and its www. name) from a service; its certificate is revoked.
    #[command(alias = "rm")]
    Remove {
        service: String,
        domain: String,
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Serve a certificate for names ACME cannot serve (checked first: key, dates, names).
    Add {
        /// A name for it (letters, digits, '-', '_', '.').
        id: String,
        /// The certificate chain, PEM (leaf first).
        #[arg(long, value_name = "PATH")]
        cert: PathBuf,
        /// Its private key, PEM.
        #[arg(long, value_name = "PATH")]
        key: PathBuf,
        /// Serve it only for these names (default: all its DNS names).
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
    },
    /// Every certificate served: source (config, api, acme), names, expiry.
    #[command(alias = "ls")]
    List,
    /// Stop serving an added certificate.
    #[command(alias = "remove")]
    Rm { id: String },
    /// Read the [tls] certificate files of lull.toml again (after another tool renewed them).
    Reload,
}

pub async fn run_domain(args: &ClientArgs, command: &DomainCommand) -> ExitCode {
    let ctx = Ctx::new(args);
    finish(match command {
        DomainCommand::Add {
            service,
            domain,
            www,
            no_wait,
        } => add(&ctx, service, domain, *www, !no_wait).await,
        DomainCommand::List { service } => list(&ctx, service.as_deref()).await,
        DomainCommand::Remove {
            service,
            domain,
            no_wait,
        } => remove(&ctx, service, domain, !no_wait).await,
    })
}

pub async fn run_cert(args: &ClientArgs, command: &CertCommand) -> ExitCode {
    let ctx = Ctx::new(args);
    finish(match command {
        CertCommand::Add {
            id,
            cert,
            key,
            names,
        } => add_cert(&ctx, id, cert, key, names).await,
        CertCommand::List => list_certs(&ctx).await,
        CertCommand::Rm { id } => {
            let path = format!("/v1/certificates/{}", segment(id));
            match ctx.send(Method::DELETE, &path, None).await {
                Ok(v) if ctx.json => {
                    print_json(&v);
                    Ok(Exit::Ok)
                }
                Ok(_) => {
                    println!("certificate {id} removed");
                    Ok(Exit::Ok)
                }
                Err(e) => Err(e),
            }
        }
        CertCommand::Reload => reload(&ctx).await,
    })
}

async fn reload(ctx: &Ctx) -> Outcome {
    let v = ctx
        .send(Method::POST, "/v1/certificates/reload", Some(&json!({})))
        .await?;
    if ctx.json {
        print_json(&v);
    } else {
        println!(
            "{} certificate(s) from lull.toml reloaded",
            cell(&v["reloaded"])
        );
    }
    Ok(Exit::Ok)
}

async fn add(ctx: &Ctx, service: &str, domain: &str, www: bool, wait: bool) -> Outcome {
    let answer = ctx
        .send(
            Method::POST,
            &format!("{}/domains", service_path(service)),
            Some(&json!({ "domain": domain, "www": www })),
        )
        .await?;
    if ctx.json {
        print_json(&answer);
    } else {
        print_instructions(&answer);
    }
    if answer["operation"].is_string() {
        let outcome = ctx.follow_started(&answer, wait).await?;
        if outcome != Exit::Ok {
            return Ok(outcome);
        }
    }
    if !ctx.json {
        println!(
            "`lull domain list {service}` shows the certificate's status (pending → validating → active)."
        );
    }
    Ok(Exit::Ok)
}

fn print_instructions(answer: &Value) {
    let names: Vec<&str> = answer["names"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    println!(
        "{} now answers on {}.",
        answer["service"].as_str().unwrap_or("the service"),
        names.join(" and ")
    );
    let records: Vec<&Value> = answer["records"].as_array().into_iter().flatten().collect();
    let (direct, cname): (Vec<&Value>, Vec<&Value>) =
        records.iter().partition(|r| r["kind"] != "CNAME");
    if direct.is_empty() && cname.is_empty() {
        println!(
            "Create A (and AAAA) records for those names pointing to this host's public address \
             (set [acme] public_addresses in lull.toml so lull can print and check them)."
        );
    } else {
        println!("Create these DNS records at your DNS provider:");
        let rows: Vec<Vec<String>> = direct
            .iter()
            .map(|r| vec![cell(&r["name"]), cell(&r["kind"]), cell(&r["value"])])
            .collect();
        print_table(&["NAME", "TYPE", "VALUE"], &rows);
        if answer["addresses_configured"] == false && !direct.is_empty() {
            println!(
                "  (these are this host's interface addresses; behind NAT use its public one, \
                 and set [acme] public_addresses)"
            );
        }
        if !cname.is_empty() {
            println!("or, instead of A/AAAA (not possible at a zone's apex):");
            let rows: Vec<Vec<String>> = cname
                .iter()
                .map(|r| vec![cell(&r["name"]), cell(&r["kind"]), cell(&r["value"])])
                .collect();
            print_table(&["NAME", "TYPE", "VALUE"], &rows);
        }
    }
    for check in answer["checks"].as_array().into_iter().flatten() {
        if check["ok"] == true {
            println!("DNS: {} points here.", cell(&check["name"]));
        } else {
            println!("DNS: {}", cell(&check["reason"]));
        }
    }
    if answer["acme"] == false {
        println!(
            "ACME is off ([acme] enabled = false): no certificate will be ordered; add one with \
             `lull cert add`."
        );
    }
}

async fn list(ctx: &Ctx, service: Option<&str>) -> Outcome {
    let path = match service {
        Some(s) => format!("{}/domains", service_path(s)),
        None => "/v1/domains".to_owned(),
    };
    let views = ctx.get(&path).await?;
    if ctx.json {
        print_json(&views);
        return Ok(Exit::Ok);
    }
    let rows: Vec<Vec<String>> = views
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let mut detail = Vec::new();
            if let Some(until) = v["not_after"].as_str() {
                detail.push(format!("valid until {until}"));
            }
            if let Some(reason) = v["reason"].as_str() {
                detail.push(reason.to_owned());
            }
            if let Some(retry) = v["retry_at"].as_str() {
                detail.push(format!("retry at {retry}"));
            }
            vec![
                cell(&v["name"]),
                cell(&v["service"]),
                cell(&v["status"]),
                detail.join("; "),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("no domains (`lull domain add SERVICE example.com` adds one)");
    } else {
        print_table(&["NAME", "SERVICE", "STATUS", "DETAIL"], &rows);
    }
    Ok(Exit::Ok)
}

async fn remove(ctx: &Ctx, service: &str, domain: &str, wait: bool) -> Outcome {
    let path = format!("{}/domains/{}", service_path(service), segment(domain));
    let started = ctx.send(Method::DELETE, &path, None).await?;
    if !ctx.json {
        println!("{domain} removed from {service}; a certificate lull obtained for it is revoked");
    }
    ctx.follow_started(&started, wait).await
}

fn read_pem(path: &Path, what: &str) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("--{what} {}: {e}", path.display())))
}

async fn add_cert(ctx: &Ctx, id: &str, cert: &Path, key: &Path, names: &[String]) -> Outcome {
    let mut body = json!({
        "cert": read_pem(cert, "cert")?,
        "key": read_pem(key, "key")?,
    });
    if !names.is_empty() {
        body["names"] = json!(names);
    }
    let answer = ctx
        .send(
            Method::PUT,
            &format!("/v1/certificates/{}", segment(id)),
            Some(&body),
        )
        .await
        .map_err(|e| match e {
            // The daemon names the fields `cert`/`key`; the user gave files.
            Failure::Client(lull_daemon::api::ClientError::Api(mut api)) => {
                for field in &mut api.fields {
                    field.message = field
                        .message
                        .replace(
                            "the certificate in cert",
                            &format!("the certificate in {}", cert.display()),
                        )
                        .replace(
                            "the private key in key",
                            &format!("the private key in {}", key.display()),
                        );
                }
                Failure::Client(lull_daemon::api::ClientError::Api(api))
            }
            other => other,
        })?;
    if ctx.json {
        print_json(&answer);
    } else {
        println!(
            "certificate {id} serves {} until {}",
            answer["names"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "),
            cell(&answer["not_after"])
        );
    }
    Ok(Exit::Ok)
}

async fn list_certs(ctx: &Ctx) -> Outcome {
    let list = ctx.get("/v1/certificates").await?;
    if ctx.json {
        print_json(&list);
        return Ok(Exit::Ok);
    }
    let rows: Vec<Vec<String>> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let names: Vec<&str> = c["names"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let source = match c["id"].as_str() {
                Some(id) => format!("{} ({id})", cell(&c["source"])),
                None => cell(&c["source"]),
            };
            let expiry = if c["expired"] == true {
                format!("EXPIRED {}", cell(&c["not_after"]))
            } else {
                cell(&c["not_after"])
            };
            vec![names.join(", "), source, expiry]
        })
        .collect();
    if rows.is_empty() {
        println!("no certificates (unknown names get the self-signed lull.invalid default)");
    } else {
        print_table(&["NAMES", "SOURCE", "NOT AFTER"], &rows);
    }
    Ok(Exit::Ok)
}

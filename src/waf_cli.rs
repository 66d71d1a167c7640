//! `vigil waf test` and `vigil waf rules`: what operators tune the WAF with. `test` runs a
//! request (a raw HTTP file, stdin, or a URL with curl-like options) through the WAF filters of
//! the route it would take, and prints every rule that matched, on which target, the value as
//! transformed, the score, the threshold and the verdict. `rules` lists the loaded pack.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use proxy::config::{Config, FilterConfig};
use proxy::filters::waf::WafFilter;

/// `vigil waf ...`
#[derive(Debug, clap::Subcommand)]
pub enum WafAction {
    /// Explain what the WAF decides about one request.
    Test {
        /// proxy.toml
        #[arg(long, short)]
        config: PathBuf,
        /// The route whose WAF filters run (default: the route the request's path takes).
        #[arg(long)]
        route: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// A raw HTTP request file, `-` for stdin, or a URL.
        request: String,
        /// With a URL: the method.
        #[arg(short = 'X', long = "request-method")]
        method: Option<String>,
        /// With a URL: the body (a POST unless -X says otherwise).
        #[arg(short = 'd', long = "data")]
        data: Option<String>,
        /// With a URL: a header, `Name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
    },
    /// List the rules of the pack (the embedded one, or a folder of rule files).
    Rules {
        /// Only this category (sqli, xss, lfi, rfi, rce, php, java, protocol, scanner, session, generic).
        #[arg(long)]
        category: Option<String>,
        /// Only rules up to this paranoia level.
        #[arg(long)]
        paranoia: Option<u8>,
        /// A folder of rule files instead of the embedded pack.
        #[arg(long)]
        rules_dir: Option<PathBuf>,
        /// Also run every rule's own tests; exit 1 if one fails.
        #[arg(long)]
        test: bool,
    },
}

/// Runs a `vigil waf` command; the text goes to stdout.
pub fn run(action: WafAction) -> anyhow::Result<()> {
    match action {
        WafAction::Test {
            config,
            route,
            json,
            request,
            method,
            data,
            headers,
        } => {
            let req = read_request(&request, method, data, &headers)?;
            let text = explain(&config, route.as_deref(), &req, json)?;
            print!("{text}");
            Ok(())
        }
        WafAction::Rules {
            category,
            paranoia,
            rules_dir,
            test,
        } => {
            let pack = match &rules_dir {
                Some(dir) => proxy::filters::waf::load_dir(dir).map_err(anyhow::Error::msg)?,
                None => waf::Pack::embedded()?,
            };
            if let Some(c) = &category
                && waf::Category::parse(c).is_none()
            {
                bail!("unknown category `{c}`");
            }
            print!("{}", list(&pack, category.as_deref(), paranoia));
            if test {
                let failures = waf::selftest::run(&pack);
                for f in &failures {
                    println!("FAIL {} rule {}: {}: {}", f.file, f.rule, f.test, f.why);
                }
                if !failures.is_empty() {
                    bail!("{} rule tests failed", failures.len());
                }
                println!("every rule's tests pass ({} rules)", pack.rules.len());
            }
            Ok(())
        }
    }
}

/// The pack as a table: id, category, paranoia, severity, targets, message.
pub fn list(pack: &waf::Pack, category: Option<&str>, paranoia: Option<u8>) -> String {
    let mut out = format!(
        "{:<7} {:<9} {:<2} {:<8} {:<40} {}\n",
        "id", "category", "pl", "severity", "targets", "message"
    );
    for r in &pack.rules {
        if category.is_some_and(|c| r.category.name() != c)
            || paranoia.is_some_and(|p| r.paranoia > p)
        {
            continue;
        }
        let mut targets: Vec<String> = r.targets.iter().map(ToString::to_string).collect();
        targets.extend(r.except.iter().map(|s| format!("!{s}")));
        let targets = if targets.is_empty() {
            "request".to_string()
        } else {
            targets.join(",")
        };
        let targets = if targets.chars().count() > 40 {
            format!("{}…", targets.chars().take(39).collect::<String>())
        } else {
            targets
        };
        out.push_str(&format!(
            "{:<7} {:<9} {:<2} {:<8} {:<40} {}\n",
            r.id,
            r.category.name(),
            r.paranoia,
            format!("{:?}", r.severity).to_lowercase(),
            targets,
            r.message
        ));
    }
    out
}

/// The request named on the command line.
fn read_request(
    request: &str,
    method: Option<String>,
    data: Option<String>,
    headers: &[String],
) -> anyhow::Result<waf::raw::OwnedRequest> {
    if request.starts_with("http://") || request.starts_with("https://") {
        let url: http::Uri = request
            .parse()
            .with_context(|| format!("`{request}` is not a URL"))?;
        let method = method.unwrap_or_else(|| if data.is_some() { "POST" } else { "GET" }.into());
        let mut raw = format!(
            "{method} {} HTTP/1.1\r\nHost: {}\r\n",
            url.path_and_query().map_or("/", |p| p.as_str()),
            url.authority().map_or("localhost", |a| a.as_str())
        );
        let named = |n: &str| {
            headers
                .iter()
                .any(|h| h.to_ascii_lowercase().starts_with(n))
        };
        for h in headers {
            if !h.contains(':') {
                bail!("-H `{h}`: a header is `Name: value`");
            }
            raw.push_str(h);
            raw.push_str("\r\n");
        }
        let body = data.unwrap_or_default();
        if !body.is_empty() && !named("content-type:") {
            raw.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        }
        if !body.is_empty() {
            raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        raw.push_str("\r\n");
        raw.push_str(&body);
        return Ok(waf::raw::parse(raw.as_bytes())?);
    }
    if method.is_some() || data.is_some() || !headers.is_empty() {
        bail!("-X, -d and -H go with a URL; a raw request carries its own");
    }
    let mut bytes = Vec::new();
    if request == "-" {
        std::io::stdin().read_to_end(&mut bytes)?;
    } else {
        bytes = std::fs::read(request).with_context(|| format!("reading {request}"))?;
    }
    waf::raw::parse(&bytes).with_context(|| format!("reading {request}"))
}

/// What the WAF filters of the route decide about `req`, as text or JSON.
pub fn explain(
    config_path: &Path,
    route: Option<&str>,
    req: &waf::raw::OwnedRequest,
    json: bool,
) -> anyhow::Result<String> {
    let config = proxy::config::load(config_path)?;
    let mut req = req.clone();
    // The path as the edge decides it, the one the proxy's WAF sees.
    let raw_path =
        String::from_utf8_lossy(req.uri.split(|&b| b == b'?').next().unwrap_or(b"/")).into_owned();
    if let Ok(p) = proxy::path::normalize(&raw_path) {
        req.path = p.path.into_owned();
    }
    let route = pick_route(&config, route, &req)?;
    let filters: Vec<(&String, &proxy::filters::waf::WafConfig)> = route
        .filters
        .iter()
        .filter_map(|name| match config.filters.get(name) {
            Some(FilterConfig::Waf(c)) => Some((name, &**c)),
            _ => None,
        })
        .collect();
    if filters.is_empty() {
        bail!("route `{}` runs no waf filter", route.name);
    }
    let metrics = proxy::metrics::Metrics::new();
    let mut text = String::new();
    let mut reports = Vec::new();
    for (name, c) in filters {
        let filter = WafFilter::new(c, &metrics).map_err(|errs| {
            anyhow::anyhow!(
                "{}",
                errs.iter()
                    .map(|(k, m)| format!("{}: filters.{name}.{k}: {m}", config.origin))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })?;
        let mut view = req.as_request();
        if !body_inspected(&filter, &req) {
            view.body = &[];
        }
        view.body_truncated = view.body.len() > c.body_limit;
        view.body = &view.body[..view.body.len().min(c.body_limit)];
        let report = filter.engine().inspect(&view);
        let verdict = match (report.blocked(), filter.mode()) {
            (None, _) => "pass".to_string(),
            (Some(reason), "detect") => format!("pass (detect mode; would block: {reason})"),
            (Some(reason), _) => format!("block ({reason})"),
        };
        text.push_str(&format!(
            "route {}, filter {name}: mode {}, paranoia {}\n",
            route.name,
            filter.mode(),
            c.paranoia
        ));
        for m in &report.matches {
            text.push_str(&format!(
                "  {:<7} {:<9} +{:<2} {:<28} {:?}  {}\n",
                m.rule,
                m.category.name(),
                m.score,
                m.target,
                m.value,
                m.message
            ));
        }
        text.push_str(&format!(
            "  score {} / threshold {}: {verdict}\n",
            report.score, report.threshold
        ));
        reports.push(serde_json::json!({
            "route": route.name,
            "filter": name,
            "mode": filter.mode(),
            "paranoia": c.paranoia,
            "score": report.score,
            "threshold": report.threshold,
            "verdict": if report.blocked().is_some() && filter.mode() == "block" { "block" } else { "pass" },
            "reason": report.blocked(),
            "matches": report.matches.iter().map(|m| serde_json::json!({
                "rule": m.rule,
                "category": m.category.name(),
                "score": m.score,
                "target": m.target,
                "value": m.value,
                "message": m.message,
            })).collect::<Vec<_>>(),
        }));
    }
    Ok(if json {
        format!("{}\n", serde_json::Value::Array(reports))
    } else {
        text
    })
}

fn body_inspected(filter: &WafFilter, req: &waf::raw::OwnedRequest) -> bool {
    let mut b = http::Request::builder()
        .method(req.method.as_str())
        .uri("/");
    for (n, v) in &req.headers {
        b = b.header(n.as_str(), v.as_slice());
    }
    b.body(())
        .map(|r| filter.inspects_type(&r.into_parts().0))
        .unwrap_or(false)
}

/// The route named, or the one whose prefix (the longest) the request's path takes.
fn pick_route<'a>(
    config: &'a Config,
    name: Option<&str>,
    req: &waf::raw::OwnedRequest,
) -> anyhow::Result<&'a proxy::config::Route> {
    if let Some(name) = name {
        return config
            .routes
            .iter()
            .find(|r| r.name == name)
            .with_context(|| format!("no route named `{name}` in {}", config.origin));
    }
    config
        .routes
        .iter()
        .filter(|r| proxy::routing::prefix_takes(&r.path_prefix, &req.path))
        .max_by_key(|r| r.path_prefix.len())
        .with_context(|| format!("no route of {} takes {}", config.origin, req.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped_config() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/proxy.toml")
    }

    #[test]
    fn a_request_is_explained_rule_by_rule_with_the_verdict() {
        let attack = read_request(
            "https://localhost/auth/x?q=1%27%20or%20%271%27%3D%271",
            None,
            None,
            &[],
        )
        .expect("request");
        let text = explain(&shipped_config(), None, &attack, false).expect("explain");
        assert!(
            text.starts_with("route auth, filter waf: mode block, paranoia 1"),
            "{text}"
        );
        assert!(text.contains("942100") && text.contains("args:q"), "{text}");
        assert!(text.contains("block (sqli)"), "{text}");
        let json = explain(&shipped_config(), Some("content"), &attack, true).expect("explain");
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(v[0]["verdict"], "block");
        assert_eq!(v[0]["route"], "content");
        assert!(v[0]["score"].as_u64().expect("score") >= 5);
        // A raw request, and the content route's exclusion: SQL in the body passes.
        let raw = waf::raw::parse(
            b"POST /content HTTP/1.1\nHost: h\nContent-Type: application/json\n\n{\"title\":\"t\",\"body\":\"SELECT * FROM t WHERE a = '1' OR 1=1\"}",
        )
        .expect("raw");
        let text = explain(&shipped_config(), None, &raw, false).expect("explain");
        assert!(
            text.contains("route content") && text.contains(": pass"),
            "{text}"
        );
        assert!(explain(&shipped_config(), Some("nope"), &raw, false).is_err());
        assert!(read_request("/nonexistent/file", None, None, &[]).is_err());
    }

    #[test]
    fn rules_are_listed_by_category_and_level() {
        let pack = waf::Pack::embedded().expect("pack");
        let text = list(&pack, Some("sqli"), Some(1));
        assert!(text.contains("942100"), "{text}");
        assert!(!text.contains(" xss "), "{text}");
    }
}

//! Router tests of the web console: every page and form, sign-in and sessions,
//! redirects when signed out, CSRF refusals, escaping of hostile names, and that
//! `/api/v1` never takes the session cookie.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use tributary_server::console::{Sessions, router_with};
use tributary_server::control::SourceType;
use tributary_server::{AppState, Config, Parts, open_state_with, router};

struct Console {
    state: Arc<AppState>,
    app: axum::Router,
    _dir: tempfile::TempDir,
}

async fn console() -> Console {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        admin_token: Some("adm_test_token".into()),
        ..Config::default()
    };
    let state = open_state_with(config, Parts::default()).await.unwrap();
    Console {
        app: router(state.clone()),
        state,
        _dir: dir,
    }
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Answer {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

async fn send(app: &axum::Router, req: Request<Body>) -> Answer {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn get(path: &str, cookie: &str) -> Request<Body> {
    Request::get(path)
        .header(header::HOST, "127.0.0.1:8088")
        .header(header::COOKIE, cookie)
        .body(Body::empty())
        .unwrap()
}

fn form(path: &str, cookie: &str, pairs: &[(&str, &str)]) -> Request<Body> {
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    Request::post(path)
        .header(header::HOST, "127.0.0.1:8088")
        .header(header::ORIGIN, "http://127.0.0.1:8088")
        .header("sec-fetch-site", "same-origin")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::COOKIE, cookie)
        .body(Body::from(body))
        .unwrap()
}

/// Signs in; returns the cookie header value and the session's CSRF token.
async fn sign_in(app: &axum::Router) -> (String, String) {
    let a = send(
        app,
        form(
            "/login",
            "",
            &[("token", "adm_test_token"), ("next", "/sources")],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    let set = a.headers[header::SET_COOKIE].to_str().unwrap().to_string();
    let cookie = set.split(';').next().unwrap().to_string();
    let page = send(app, get("/sources/new", &cookie)).await;
    let csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("forms carry the csrf token")
        .to_string();
    (cookie, csrf)
}

#[tokio::test]
async fn signed_out_pages_redirect_to_sign_in_with_the_page_to_return_to() {
    let c = console().await;
    let src = c
        .state
        .control
        .create(SourceType::Http, "web", "web", json!({}))
        .unwrap();
    for path in [
        "/".to_string(),
        "/sources".into(),
        "/sources/new".into(),
        format!("/sources/{}", src.id),
        format!("/sources/{}/debugger", src.id),
        format!("/sources/{}/debugger/stream", src.id),
        "/destinations".into(),
        "/destinations/new".into(),
        "/warehouse".into(),
        "/reports/email".into(),
    ] {
        let a = send(&c.app, get(&path, "")).await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "{path}");
        assert!(
            a.location().starts_with("/login?next=%2F"),
            "{path}: {}",
            a.location()
        );
    }
    let a = send(&c.app, form("/sources", "", &[("name", "x")])).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    let login = send(&c.app, get("/login?next=/sources", "")).await;
    assert_eq!(login.status, StatusCode::OK);
    assert!(
        login.body.contains("<label for=\"token\">Admin token"),
        "{}",
        login.body
    );
}

#[tokio::test]
async fn sign_in_sets_a_random_http_only_strict_cookie_and_refuses_a_wrong_token() {
    let c = console().await;
    let a = send(&c.app, form("/login", "", &[("token", "wrong")])).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.headers.get(header::SET_COOKIE).is_none());
    assert!(a.body.contains("aria-invalid=\"true\""), "{}", a.body);
    assert!(a.body.contains("not right"), "{}", a.body);

    let a = send(
        &c.app,
        form(
            "/login",
            "",
            &[("token", "adm_test_token"), ("next", "//evil.example")],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(a.location(), "/sources", "never an off-site redirect");
    let set = a.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(set.starts_with("tributary_session="), "{set}");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(!set.contains("Secure"), "plain http: no Secure ({set})");
    assert!(
        !set.contains("adm_test_token"),
        "the token is never the cookie"
    );

    let mut req = form("/login", "", &[("token", "adm_test_token")]);
    req.headers_mut()
        .insert("x-forwarded-proto", "https".parse().unwrap());
    let a = send(&c.app, req).await;
    assert!(
        a.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("; Secure")
    );
}

#[tokio::test]
async fn sign_out_ends_the_session_and_sessions_expire() {
    let c = console().await;
    let (cookie, csrf) = sign_in(&c.app).await;
    let a = send(&c.app, form("/logout", &cookie, &[("csrf", &csrf)])).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(
        a.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let a = send(&c.app, get("/sources", &cookie)).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "signed out");

    let app = router_with(Arc::new(Sessions::new(Duration::from_millis(200))))
        .with_state(c.state.clone());
    let (cookie, _) = sign_in(&app).await;
    assert_eq!(
        send(&app, get("/sources", &cookie)).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = send(&app, get("/sources", &cookie)).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "expired");
}

#[tokio::test]
async fn every_page_answers_html_under_a_strict_csp() {
    let c = console().await;
    let (cookie, csrf) = sign_in(&c.app).await;
    let a = send(
        &c.app,
        form(
            "/sources",
            &cookie,
            &[
                ("csrf", &csrf),
                ("type", "activecampaign"),
                ("name", "AC"),
                ("schema", "activecampaign"),
            ],
        ),
    )
    .await;
    let id = a
        .location()
        .trim_start_matches("/sources/")
        .split('?')
        .next()
        .unwrap()
        .to_string();
    let a = send(
        &c.app,
        form(
            "/destinations",
            &cookie,
            &[
                ("csrf", &csrf),
                ("type", "webhook"),
                ("name", "hook"),
                ("webhook-url", "http://127.0.0.1:9/x"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    let dst = a
        .location()
        .trim_start_matches("/destinations/")
        .split('?')
        .next()
        .unwrap()
        .to_string();
    for path in [
        "/".to_string(),
        "/sources".into(),
        "/sources/new".into(),
        "/sources/new?type=http".into(),
        format!("/sources/{id}"),
        format!("/sources/{id}/debugger"),
        format!("/sources/{id}/debugger?type=track&status=accepted&who=x"),
        "/destinations".into(),
        "/destinations/new".into(),
        format!("/destinations/{dst}"),
        "/warehouse".into(),
        "/reports/email".into(),
        format!("/reports/email?source={id}&from=2026-01-01&to=2026-12-31"),
    ] {
        let a = send(&c.app, get(&path, &cookie)).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.body);
        assert_eq!(
            a.headers[header::CONTENT_TYPE],
            "text/html; charset=utf-8",
            "{path}"
        );
        let csp = a.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert_eq!(a.headers[header::CACHE_CONTROL], "no-store", "{path}");
        assert!(a.body.contains("href=\"#main\""), "{path}: skip link");
        assert!(!a.body.contains("<script>"), "{path}: no inline script");
        assert!(!a.body.contains(" onclick="), "{path}: no inline handlers");
    }
    let a = send(&c.app, get("/sources/src_nope", &cookie)).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = send(
        &c.app,
        get(
            &format!("/reports/email?source={id}&from=yesterday"),
            &cookie,
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("from"), "{}", a.body);
}

#[tokio::test]
async fn assets_are_served_with_a_long_cache_under_a_versioned_url() {
    let c = console().await;
    let (cookie, _) = sign_in(&c.app).await;
    let page = send(&c.app, get("/sources", &cookie)).await;
    let href = page
        .body
        .split("href=\"/assets/console.css?v=")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("versioned stylesheet link");
    assert!(page.body.contains("src=\"/assets/console.js?v="));
    let a = send(&c.app, get(&format!("/assets/console.css?v={href}"), "")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.headers[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    assert!(
        a.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    let a = send(&c.app, get("/assets/console.js", "")).await;
    assert!(
        a.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
}

#[tokio::test]
async fn forms_refuse_cross_site_and_token_less_posts_with_403() {
    let c = console().await;
    let (cookie, csrf) = sign_in(&c.app).await;
    let fields = [("type", "http"), ("name", "x"), ("schema", "xs")];
    let a = send(&c.app, form("/sources", &cookie, &fields)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "no token");
    let mut with = vec![("csrf", csrf.as_str())];
    with.extend(fields);
    let a = send(
        &c.app,
        form(
            "/sources",
            &cookie,
            &[
                ("csrf", "forged"),
                ("type", "http"),
                ("name", "x"),
                ("schema", "xs"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "wrong token");
    let mut req = form("/sources", &cookie, &with);
    req.headers_mut()
        .insert(header::ORIGIN, "http://evil.example".parse().unwrap());
    assert_eq!(
        send(&c.app, req).await.status,
        StatusCode::FORBIDDEN,
        "foreign Origin"
    );
    let mut req = form("/sources", &cookie, &with);
    req.headers_mut()
        .insert("sec-fetch-site", "cross-site".parse().unwrap());
    assert_eq!(
        send(&c.app, req).await.status,
        StatusCode::FORBIDDEN,
        "cross-site"
    );
    let mut req = form("/login", "", &[("token", "adm_test_token")]);
    req.headers_mut()
        .insert("sec-fetch-site", "cross-site".parse().unwrap());
    assert_eq!(
        send(&c.app, req).await.status,
        StatusCode::FORBIDDEN,
        "cross-site sign-in"
    );
    assert!(c.state.control.sources().is_empty(), "nothing was created");
    for path in ["/logout", "/warehouse", "/destinations"] {
        let a = send(&c.app, form(path, &cookie, &[("sql", "select 1")])).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{path}");
    }
    let a = send(&c.app, form("/sources", &cookie, &with)).await;
    assert_eq!(
        a.status,
        StatusCode::SEE_OTHER,
        "same form with the token: {}",
        a.body
    );
}

#[tokio::test]
async fn creating_a_source_checks_the_schema_by_the_servers_rule() {
    let c = console().await;
    let (cookie, csrf) = sign_in(&c.app).await;
    let ok = send(
        &c.app,
        get("/sources/new/check?schema=activecampaign", &cookie),
    )
    .await;
    assert_eq!(serde_json::from_str::<Value>(&ok.body).unwrap()["ok"], true);
    let bad = send(&c.app, get("/sources/new/check?schema=Bad-Name", &cookie)).await;
    let v: Value = serde_json::from_str(&bad.body).unwrap();
    assert_eq!(v["ok"], false);
    assert!(!v["message"].as_str().unwrap().is_empty());

    let a = send(
        &c.app,
        form(
            "/sources",
            &cookie,
            &[
                ("csrf", &csrf),
                ("type", "activecampaign"),
                ("name", "AC"),
                ("schema", "Bad-Name"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(
        a.body.contains("id=\"schema\"") && a.body.contains("aria-invalid=\"true\""),
        "{}",
        a.body
    );
    assert!(
        a.body
            .contains("aria-describedby=\"schema-hint schema-error\"")
    );
    assert!(a.body.contains("There is a problem"));

    let a = send(
        &c.app,
        form(
            "/sources",
            &cookie,
            &[
                ("csrf", &csrf),
                ("type", "activecampaign"),
                ("name", "AC"),
                ("schema", "activecampaign"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(a.location().ends_with("?created=1"), "{}", a.location());
    let overview = send(&c.app, get(a.location(), &cookie)).await;
    let s = &c.state.control.sources()[0];
    assert!(overview.body.contains(&s.write_key), "write key shown");
    assert!(overview.body.contains(&format!(
        "/v1/webhooks/activecampaign?writeKey={}",
        s.write_key
    )));
    assert!(overview.body.contains("Waiting for the first event"));
    assert!(overview.body.contains("Settings → Developer → Webhooks"));

    let check = send(
        &c.app,
        get("/sources/new/check?schema=activecampaign", &cookie),
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&check.body).unwrap()["ok"],
        false,
        "taken"
    );
    let a = send(
        &c.app,
        form(
            "/sources",
            &cookie,
            &[
                ("csrf", &csrf),
                ("type", "http"),
                ("name", "Again"),
                ("schema", "activecampaign"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    let a = send(
        &c.app,
        form(
            "/sources",
            &cookie,
            &[
                ("csrf", &csrf),
                ("type", "ftp"),
                ("name", " "),
                ("schema", "x"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("Choose a source type"));
}

#[tokio::test]
async fn hostile_names_render_as_text() {
    let c = console().await;
    let (cookie, csrf) = sign_in(&c.app).await;
    let evil = "<script>alert(1)</script>";
    let a = send(
        &c.app,
        form(
            "/sources",
            &cookie,
            &[
                ("csrf", &csrf),
                ("type", "http"),
                ("name", evil),
                ("schema", "web"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    let id = c.state.control.sources()[0].id.clone();
    let a = send(
        &c.app,
        form(
            "/destinations",
            &cookie,
            &[
                ("csrf", &csrf),
                ("type", "webhook"),
                ("name", evil),
                ("webhook-url", "http://127.0.0.1:9/x"),
                ("source_ids", &id),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    let dst = a
        .location()
        .trim_start_matches("/destinations/")
        .split('?')
        .next()
        .unwrap()
        .to_string();
    for path in [
        "/sources".to_string(),
        format!("/sources/{id}"),
        format!(
            "/sources/{id}/debugger?event={}",
            "%3Cscript%3Ealert(1)%3C%2Fscript%3E"
        ),
        "/destinations".into(),
        "/destinations/new".into(),
        format!("/destinations/{dst}"),
        "/reports/email".into(),
    ] {
        let a = send(&c.app, get(&path, &cookie)).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert!(!a.body.contains(evil), "{path} has the raw name");
        assert!(
            a.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{path} shows it as text"
        );
    }
}

#[tokio::test]
async fn overview_actions_rotate_the_key_disable_and_delete() {
    let c = console().await;
    let (cookie, csrf) = sign_in(&c.app).await;
    let s = c
        .state
        .control
        .create(SourceType::Activecampaign, "AC", "ac", json!({}))
        .unwrap();
    let path = format!("/sources/{}", s.id);
    let a = send(
        &c.app,
        form(&path, &cookie, &[("csrf", &csrf), ("action", "rotate")]),
    )
    .await;
    assert_eq!(a.location(), format!("{path}?done=rotated"));
    let now = c.state.control.source(&s.id).unwrap();
    assert_ne!(now.write_key, s.write_key);
    assert!(
        c.state.control.source_by_key(&s.write_key).is_none(),
        "old key refused"
    );
    let page = send(&c.app, get(a.location(), &cookie)).await;
    assert!(page.body.contains(&now.write_key) && page.body.contains("old key no longer works"));

    let a = send(
        &c.app,
        form(&path, &cookie, &[("csrf", &csrf), ("action", "disable")]),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(!c.state.control.source(&s.id).unwrap().enabled);
    let page = send(&c.app, get(&path, &cookie)).await;
    assert!(page.body.contains("Disabled") && page.body.contains("Enable source"));
    send(
        &c.app,
        form(&path, &cookie, &[("csrf", &csrf), ("action", "enable")]),
    )
    .await;
    assert!(c.state.control.source(&s.id).unwrap().enabled);

    let j = send(&c.app, get(&format!("{path}/last-event"), &cookie)).await;
    let v: Value = serde_json::from_str(&j.body).unwrap();
    assert_eq!(v["status"], "Waiting for the first event");

    let a = send(
        &c.app,
        form(&path, &cookie, &[("csrf", &csrf), ("action", "explode")]),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = send(
        &c.app,
        form(&path, &cookie, &[("csrf", &csrf), ("action", "delete")]),
    )
    .await;
    assert_eq!(a.location(), "/sources");
    assert!(c.state.control.source(&s.id).is_none());
}

#[tokio::test]
async fn destination_form_ties_engine_errors_to_fields_and_pages_show_stats() {
    let c = console().await;
    let (cookie, csrf) = sign_in(&c.app).await;
    let a = send(
        &c.app,
        form(
            "/destinations",
            &cookie,
            &[
                ("csrf", &csrf),
                ("type", "webhook"),
                ("name", "hook"),
                ("webhook-url", "not a url"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(
        a.body
            .contains("id=\"webhook-url-error\">webhook settings: url"),
        "{}",
        a.body
    );
    assert!(
        a.body.contains("href=\"#webhook-url\""),
        "summary links to the field"
    );
    let a = send(
        &c.app,
        form(
            "/destinations",
            &cookie,
            &[
                ("csrf", &csrf),
                ("type", "webhook"),
                ("name", "hook"),
                ("webhook-url", "http://127.0.0.1:9/"),
                ("webhook-batch_size", "many"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("Batch size must be a number"));
    let a = send(
        &c.app,
        form(
            "/destinations",
            &cookie,
            &[("csrf", &csrf), ("type", "segment"), ("name", "seg")],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(
        a.body
            .contains("segment-write_key-error\">segment settings"),
        "{}",
        a.body
    );
    let a = send(
        &c.app,
        form(
            "/destinations",
            &cookie,
            &[
                ("csrf", &csrf),
                ("type", "webhook"),
                ("name", "hook"),
                ("webhook-url", "http://127.0.0.1:9/"),
                ("webhook-headers", "Authorization: Bearer x"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    let path = a.location().split('?').next().unwrap().to_string();
    let page = send(&c.app, get(&path, &cookie)).await;
    assert!(page.body.contains("Dead letters") && page.body.contains("Backlog"));
    let stats = send(&c.app, get(&format!("{path}/stats"), &cookie)).await;
    let v: Value = serde_json::from_str(&stats.body).unwrap();
    assert_eq!(v["dead_letters"], 0);
    let a = send(
        &c.app,
        form(&path, &cookie, &[("csrf", &csrf), ("action", "replay")]),
    )
    .await;
    assert!(a.location().contains("replayed=0"), "{}", a.location());
    let a = send(
        &c.app,
        form(&path, &cookie, &[("csrf", &csrf), ("action", "disable")]),
    )
    .await;
    assert!(a.location().ends_with("done=disabled"));
    let list = send(&c.app, get("/destinations", &cookie)).await;
    assert!(list.body.contains("Paused"));
    let a = send(
        &c.app,
        form(&path, &cookie, &[("csrf", &csrf), ("action", "delete")]),
    )
    .await;
    assert_eq!(a.location(), "/destinations");
}

#[tokio::test]
async fn the_sql_box_shows_results_downloads_csv_and_explains_refusals() {
    let c = console().await;
    let (cookie, csrf) = sign_in(&c.app).await;
    let a = send(
        &c.app,
        form(
            "/warehouse",
            &cookie,
            &[
                ("csrf", &csrf),
                ("sql", "select 1 as one, 'a,b' as two"),
                ("format", "html"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert!(
        a.body.contains("<th scope=\"col\">one</th>") && a.body.contains("<td>a,b</td>"),
        "{}",
        a.body
    );
    let a = send(
        &c.app,
        form(
            "/warehouse",
            &cookie,
            &[
                ("csrf", &csrf),
                ("sql", "select 1 as one, 'a,b' as two"),
                ("format", "csv"),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers[header::CONTENT_TYPE], "text/csv; charset=utf-8");
    assert!(
        a.headers[header::CONTENT_DISPOSITION]
            .to_str()
            .unwrap()
            .contains("attachment")
    );
    assert_eq!(a.body, "one,two\r\n1,\"a,b\"\r\n");
    let a = send(
        &c.app,
        form(
            "/warehouse",
            &cookie,
            &[("csrf", &csrf), ("sql", "delete from x")],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("id=\"sql-error\">") && a.body.contains("aria-invalid=\"true\""));
}

#[tokio::test]
async fn the_admin_api_never_takes_the_session_cookie() {
    let c = console().await;
    let (cookie, _) = sign_in(&c.app).await;
    let a = send(&c.app, get("/api/v1/sources", &cookie)).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_debugger_streams_with_a_session_and_shows_a_stored_events_fate() {
    let c = console().await;
    let (cookie, _) = sign_in(&c.app).await;
    let s = c
        .state
        .control
        .create(SourceType::Http, "web", "web", json!({}))
        .unwrap();
    let req = Request::post("/v1/track")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"writeKey": s.write_key, "userId": "u1", "event": "Signed Up", "messageId": "m-1"})
                .to_string(),
        ))
        .unwrap();
    assert_eq!(send(&c.app, req).await.status, StatusCode::OK);
    let page = send(&c.app, get(&format!("/sources/{}/debugger", s.id), &cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body.contains("Signed Up") && page.body.contains("data-mid=\"m-1\""),
        "{}",
        page.body
    );
    assert!(page.body.contains("debugger/fate?message_id=m-1"));
    let filtered = send(
        &c.app,
        get(
            &format!("/sources/{}/debugger?event=nothing", s.id),
            &cookie,
        ),
    )
    .await;
    assert!(
        !filtered.body.contains("data-mid=\"m-1\""),
        "filters apply without JavaScript"
    );

    let resp = c
        .app
        .clone()
        .oneshot(get(&format!("/sources/{}/debugger/stream", s.id), &cookie))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    drop(resp);

    let fate = send(
        &c.app,
        get(
            &format!("/sources/{}/debugger/fate?message_id=m-1", s.id),
            &cookie,
        ),
    )
    .await;
    assert_eq!(fate.status, StatusCode::OK, "{}", fate.body);
    assert!(
        fate.body.contains("seq 1")
            && fate.body.contains("2. Warehouse")
            && fate.body.contains("3. Destinations")
    );
    let none = send(
        &c.app,
        get(
            &format!("/sources/{}/debugger/fate?message_id=nope", s.id),
            &cookie,
        ),
    )
    .await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn overview_shows_api_sync_state_and_starts_a_backfill() {
    let c = console().await;
    let (cookie, csrf) = sign_in(&c.app).await;
    // Settings stored as the admin API would after checking them; port 9 refuses,
    // so the run started below fails in the background without leaving the machine.
    let s = c
        .state
        .control
        .create(
            SourceType::Activecampaign,
            "AC",
            "ac",
            json!({"api": {"url": "http://127.0.0.1:9", "key": "secret-key-4242", "poll_minutes": 15}}),
        )
        .unwrap();
    let path = format!("/sources/{}", s.id);
    let page = send(&c.app, get(&path, &cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("API sync") && page.body.contains("Not run yet"));
    assert!(page.body.contains("Start backfill") && page.body.contains("for=\"sync-since\""));
    assert!(
        !page.body.contains("secret-key-4242"),
        "the API key is never shown"
    );

    let bad = send(
        &c.app,
        form(
            &path,
            &cookie,
            &[
                ("csrf", &csrf),
                ("action", "sync"),
                ("since", "last tuesday"),
            ],
        ),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("is not an RFC 3339 time"), "{}", bad.body);

    let a = send(
        &c.app,
        form(
            &path,
            &cookie,
            &[("csrf", &csrf), ("action", "sync"), ("since", "2026-01-01")],
        ),
    )
    .await;
    assert_eq!(
        a.location(),
        format!("{path}?done=sync_started"),
        "{}",
        a.body
    );
    let page = send(&c.app, get(a.location(), &cookie)).await;
    assert!(page.body.contains("The API backfill started"));
    assert!(
        page.body.contains("Running") || page.body.contains("Failed"),
        "the run's state is shown in words"
    );
}

/// The rows of `console_sessions` in the embedded control store.
fn stored_sessions(c: &Console) -> Vec<String> {
    let db = rusqlite::Connection::open(c._dir.path().join("control.db")).unwrap();
    let mut st = db
        .prepare("SELECT id_hash FROM console_sessions ORDER BY id_hash")
        .unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test]
async fn sessions_are_stored_as_hashes_expire_and_expired_rows_are_pruned() {
    let c = console().await;
    let short = router_with(Arc::new(Sessions::new(Duration::from_millis(300))))
        .with_state(c.state.clone());
    let (cookie, _) = sign_in(&short).await;
    let id = cookie.split_once('=').unwrap().1.to_string();
    let rows = stored_sessions(&c);
    assert_eq!(
        rows,
        vec![tributary_server::control::session_hash(&id)],
        "only the id's hash is stored"
    );
    assert!(!rows[0].contains(&id) && rows[0].len() == 64);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let a = send(&short, get("/sources", &cookie)).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "expired");
    assert!(a.location().starts_with("/login"), "{}", a.location());

    // The next sign-in deletes the expired row; sign-out deletes its own.
    let (cookie2, csrf2) = sign_in(&c.app).await;
    let id2 = cookie2.split_once('=').unwrap().1.to_string();
    assert_eq!(
        stored_sessions(&c),
        vec![tributary_server::control::session_hash(&id2)]
    );
    let a = send(&c.app, form("/logout", &cookie2, &[("csrf", &csrf2)])).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(stored_sessions(&c).is_empty(), "sign-out deletes the row");
    assert_eq!(
        send(&c.app, get("/sources", &cookie2)).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn a_session_survives_a_restart_of_the_console() {
    // Sessions live in the control store, not in the router: a new router (a
    // restarted process on the same data dir) still knows them.
    let c = console().await;
    let (cookie, _) = sign_in(&c.app).await;
    let fresh = router(c.state.clone());
    assert_eq!(
        send(&fresh, get("/sources", &cookie)).await.status,
        StatusCode::OK
    );
}

fn login_from(addr: &str, token: &str) -> Request<Body> {
    let mut req = form("/login", "", &[("token", token), ("next", "/sources")]);
    let peer: std::net::SocketAddr = format!("{addr}:40000").parse().unwrap();
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    req
}

#[tokio::test]
async fn sign_in_is_rate_limited_per_client_address_with_retry_after() {
    use tributary_server::console::session::SignInLimit;
    let c = console().await;
    let app = router_with(Arc::new(Sessions::with_limit(
        Duration::from_secs(3600),
        SignInLimit::new(3, Duration::from_secs(60)),
    )))
    .with_state(c.state.clone());
    for _ in 0..2 {
        let a = send(&app, login_from("10.1.1.1", "wrong")).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    let a = send(&app, login_from("10.1.1.1", "wrong")).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    let retry: u64 = a.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert!(
        a.body.contains("Too many wrong admin tokens") && a.body.contains("try again in 1 minute"),
        "{}",
        a.body
    );
    assert!(
        a.body.contains("aria-invalid=\"true\""),
        "the message is tied to the field"
    );
    // The right token is refused too while the address is paused: no cookie.
    let a = send(&app, login_from("10.1.1.1", "adm_test_token")).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(a.headers.get(header::SET_COOKIE).is_none());
    // Another address signs in.
    let a = send(&app, login_from("10.2.2.2", "adm_test_token")).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    assert!(a.headers.get(header::SET_COOKIE).is_some());
}

//! Startup and login: the startup packet, authentication, admission, and the first
//! server round trip that learns the server's parameters and checks the client's.

use super::*;

/// Reads the startup packet and logs the client in. `Ok(None)` for cancel requests and other
/// connections that end without a session.
pub(super) async fn startup(
    shared: &Arc<Shared>,
    io: &mut ClientIo,
    peer: Option<SocketAddr>,
) -> Result<Option<Login>, End> {
    let packet = loop {
        match StartupPacket::decode(&mut io.rbuf) {
            Ok(Some(StartupPacket::SslRequest)) | Ok(Some(StartupPacket::GssEncRequest)) => {
                io.wbuf.extend_from_slice(b"N");
                io.flush().await.map_err(|e| End::Protocol(e.to_string()))?;
            }
            Ok(Some(StartupPacket::Cancel { pid, secret })) => {
                let timeout = shared.config().sluice.cancel_wait_timeout;
                let shared = shared.clone();
                shared.cancels.cancel(pid, &secret, timeout).await;
                return Ok(None);
            }
            Ok(Some(p @ StartupPacket::Startup { .. })) => break p,
            Ok(None) => match io.fill().await {
                Ok(()) => {}
                Err(_) => return Err(End::Client),
            },
            Err(e) => {
                let code = e.sqlstate();
                let msg = match e {
                    sluice_wire::WireError::InvalidStartupLength(_) => {
                        "invalid length of startup packet".to_string()
                    }
                    sluice_wire::WireError::UnsupportedProtocol { major, minor } => {
                        format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")
                    }
                    sluice_wire::WireError::DirectTls => {
                        // A TLS ClientHello: there is no TLS to speak, just close.
                        return Err(End::Protocol("direct TLS is not supported".into()));
                    }
                    other => format!("invalid startup packet layout: {other}"),
                };
                io.send_error(&ErrorFields::fatal(code, msg.clone())).await;
                return Err(End::Protocol(msg));
            }
        }
    };
    let StartupPacket::Startup {
        version,
        params,
        unrecognized_protocol_options,
    } = packet
    else {
        return Err(End::Protocol("unexpected packet".into()));
    };
    if version.minor > 0 || !unrecognized_protocol_options.is_empty() {
        sluice_wire::startup::encode_negotiate_protocol_version(
            &mut io.wbuf,
            0,
            &unrecognized_protocol_options,
        );
    }
    let get = |k: &str| {
        params
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    let user = get("user").unwrap_or_default();
    let db = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    let app = get("application_name").unwrap_or_default();
    if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off" && r != "no") {
        let f = ErrorFields::fatal(
            SqlState::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported by Sluice in transaction mode",
        );
        return Err(refuse(io, &shared.config(), peer, &user, &db, f).await);
    }
    let cfg = shared.config();
    // Authenticate.
    let known = cfg.users.contains_key(&user);
    let method = if known {
        cfg.auth_type(&user)
    } else {
        cfg.sluice.auth_type
    };
    let secret = cfg.users.get(&user).and_then(|u| u.password.as_ref());
    let outcome = auth::authenticate(io, &user, known, method, secret, &shared.mock_key)
        .await
        .map_err(|e| End::Protocol(e.to_string()))?;
    let keys = match outcome {
        AuthOutcome::Ok(keys) => keys,
        AuthOutcome::Refused(f) => return Err(refuse(io, &cfg, peer, &user, &db, f).await),
    };
    let admin_db = db == "sluice" || db == "pgbouncer";
    if admin_db {
        let allowed =
            cfg.sluice.admin_users.contains(&user) || cfg.sluice.stats_users.contains(&user);
        if !allowed {
            let f = ErrorFields::fatal(
                SqlState::INSUFFICIENT_PRIVILEGE,
                format!("not allowed to connect to the admin console as \"{user}\""),
            );
            return Err(refuse(io, &cfg, peer, &user, &db, f).await);
        }
        backend::encode_auth_ok(&mut io.wbuf);
        let admin = crate::admin::Admin::new(
            shared.clone(),
            user.clone(),
            cfg.sluice.admin_users.contains(&user),
        );
        return Ok(Some(Login::Admin(admin)));
    }
    if !cfg.databases.contains_key(&db) {
        let f = ErrorFields::fatal(
            SqlState::INVALID_CATALOG_NAME,
            format!("database \"{db}\" does not exist"),
        );
        return Err(refuse(io, &cfg, peer, &user, &db, f).await);
    }
    let Some(pool) = shared.pools.get(&cfg, &db, &user) else {
        let f = ErrorFields::fatal(
            SqlState::INVALID_CATALOG_NAME,
            format!("database \"{db}\" does not exist"),
        );
        return Err(refuse(io, &cfg, peer, &user, &db, f).await);
    };
    if let Some(k) = keys {
        // Pass-through: the server connections of this role can now log in with the
        // client's own SCRAM key, as PgBouncer does.
        pool.pool.connector().spec().keys.learn(k);
    }
    // Admission by policy.
    let facts = ClientFacts {
        user: &user,
        database: &db,
        application_name: &app,
        addr: peer.map(|p| p.ip()),
        port: peer.map_or(0, |p| p.port()),
        tls: false,
        params: &params,
    };
    let decision = shared.policy.on_connect(&facts);
    let mut admission = match decision {
        ConnectDecision::Admit(a) => a,
        ConnectDecision::Reject(r) => {
            let code =
                SqlState::parse(r.sqlstate.as_str()).unwrap_or(SqlState::INSUFFICIENT_PRIVILEGE);
            let f = ErrorFields::fatal(code, r.message);
            return Err(refuse(io, &cfg, peer, &user, &db, f).await);
        }
    };
    // From here on, however the login ends, the plugins hear of it (on-disconnect).
    let admitted = Admitted::new(
        shared.policy.clone(),
        std::mem::replace(&mut admission.cookies, sluice_policy::Cookies::EMPTY),
    );
    // Client connection limits.
    let class_name = admission
        .class
        .clone()
        .or_else(|| cfg.users.get(&user).and_then(|u| u.class.clone()))
        .unwrap_or_else(|| cfg.scheduler.default_class.clone());
    let counted = match shared.clients.admit(
        &cfg,
        &user,
        &db,
        &app,
        peer,
        admission.limit_key.as_deref(),
        admission.key_max_clients,
    ) {
        Ok(c) => c,
        Err(msg) => {
            let f = ErrorFields::fatal(SqlState::TOO_MANY_CONNECTIONS, msg);
            return Err(refuse(io, &cfg, peer, &user, &db, f).await);
        }
    };
    let mut client_params = match ClientParams::from_startup(&params) {
        Ok(p) => p,
        Err(msg) => {
            let f = ErrorFields::fatal(SqlState::INVALID_PARAMETER_VALUE, msg);
            return Err(refuse(io, &cfg, peer, &user, &db, f).await);
        }
    };
    let class = pool
        .pool
        .class_index(&class_name)
        .unwrap_or_else(|| pool.pool.default_class());
    // Without the policy's choice, each wait takes the class's priority as configured then.
    let priority = admission.priority;
    let key = admission.limit_key.as_ref().and_then(|k| {
        admission.key_max_active.map(|m| KeyLimit {
            key: Arc::from(k.as_str()),
            max_active: m,
        })
    });
    let cancel = shared.cancels.register();
    let info = shared.clients.register(ClientInfo::new(
        &user,
        &db,
        &app,
        peer,
        cancel.pid,
        &class_name,
    ));
    // Registered after the shutdown's sweeps of all clients: switch off at once.
    if shared.hard_stop.is_cancelled() {
        info.kill.flip();
    }
    if shared.shutdown.is_cancelled() {
        info.kill.end_when_idle();
    }
    let mut session = Session {
        shared: shared.clone(),
        pool,
        info,
        cancel,
        params: ClientParams::default(),
        statements: ClientStatements::default(),
        ticket: Ticket {
            class,
            priority,
            key,
        },
        rate: admission
            .key_rate
            .map(|r| (admission.limit_key.clone().unwrap_or_default(), r)),
        admitted,
        class_name,
        _counted: counted,
        relay: None,
        to_server: BytesMut::with_capacity(4096),
        server_read: ArmedRead::default(),
        settings: Settings::resolve(shared, &user),
    };
    // Learn the server's parameters and validate the client's own on a real connection.
    if let Err(f) = session.prepare_params(io, &mut client_params).await {
        return Err(refuse(io, &cfg, peer, &user, &db, f).await);
    }
    client_params.intern();
    session.params = client_params;
    backend::encode_auth_ok(&mut io.wbuf);
    session.welcome(&mut io.wbuf);
    if cfg.sluice.log_connections {
        let i = &session.info;
        info!(client.id = i.id, peer = %Peer(peer), user = i.user.as_str(), db = i.db.as_str(), app = i.app.as_str(), class = session.class_name.as_str(), "client connected");
    }
    if io.flush().await.is_err() {
        return Err(End::Client);
    }
    Ok(Some(Login::Client(Box::new(session))))
}

impl Session {
    pub(super) fn welcome(&self, out: &mut BytesMut) {
        self.pool.encode_parameter_status(&self.params, out);
        backend::encode_backend_key_data(out, self.cancel.pid, &self.cancel.secret());
        backend::encode_ready_for_query(out, TransactionStatus::Idle);
    }

    /// At login: makes sure the pool knows the server's parameters, and checks startup
    /// parameters the server has not accepted before, as PostgreSQL would at connect time.
    pub(super) async fn prepare_params(
        &mut self,
        io: &mut ClientIo,
        params: &mut ClientParams,
    ) -> Result<(), ErrorFields> {
        let known = self.pool.welcome.read().is_some();
        let mut pending = Vec::new();
        {
            let validated = self.pool.validated.lock();
            for (key, name, value) in params.desired() {
                if key == "application_name" {
                    continue;
                }
                let raw = match value {
                    crate::params::ParamValue::Literal(v) => v.clone(),
                    crate::params::ParamValue::Sql(v) => v.clone(),
                };
                match validated.get(&(key.to_string(), raw.clone())) {
                    Some(Some(norm)) => pending.push((name.to_string(), raw, Some(norm.clone()))),
                    Some(None) => {}
                    None => pending.push((name.to_string(), raw, None)),
                }
            }
        }
        for (name, _, norm) in &pending {
            if let Some(n) = norm {
                params.normalise(name, n);
            }
        }
        let unchecked: Vec<(String, String)> = pending
            .into_iter()
            .filter(|(_, _, n)| n.is_none())
            .map(|(name, raw, _)| (name, raw))
            .collect();
        if known && unchecked.is_empty() {
            return Ok(());
        }
        let mut guard = match self.checkout_now() {
            Some(g) => g,
            None => self.checkout(io, true).await?,
        };
        if !known {
            let mut welcome: Vec<(String, String)> = guard
                .params
                .iter()
                .map(|(k, v)| (canonical(k).to_string(), v.clone()))
                .collect();
            welcome.sort();
            *self.pool.welcome.write() = Some(Arc::new(welcome));
        }
        if unchecked.is_empty() {
            return Ok(());
        }
        let mut sql = String::new();
        for (name, raw) in &unchecked {
            if !crate::params::valid_name(name) {
                return Err(ErrorFields::fatal(
                    SqlState::new(b"42704"),
                    format!("unrecognized configuration parameter \"{name}\""),
                ));
            }
            sql.push_str(&crate::params::set_sql(
                name,
                &crate::params::ParamValue::Literal(raw.to_string()),
            ));
        }
        let server: &mut ServerConn = &mut guard;
        let mut out = BytesMut::new();
        frontend::encode_query(&mut out, &sql);
        let reported = run_simple(server, &out).await.map_err(|e| {
            let mut e = e;
            e.severity = Severity::Fatal;
            e
        })?;
        // Put the session back as it was; the client's values are applied per transaction.
        let mut out = BytesMut::new();
        let resets: String = unchecked
            .iter()
            .map(|(n, _)| format!("RESET {n};"))
            .collect();
        frontend::encode_query(&mut out, &resets);
        if run_simple(server, &out).await.is_err() {
            server.broken = true;
        }
        let mut validated = self.pool.validated.lock();
        for (name, raw) in unchecked {
            let key = name.to_ascii_lowercase();
            let norm = reported
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(&name))
                .map(|(_, v)| v.clone());
            if let Some(n) = &norm {
                params.normalise(&name, n);
            }
            validated.insert((key, raw), norm);
        }
        Ok(())
    }
}

/// The canonical spelling of a reported parameter name.
pub(super) fn canonical(lower: &str) -> &str {
    match lower {
        "datestyle" => "DateStyle",
        "intervalstyle" => "IntervalStyle",
        "timezone" => "TimeZone",
        other => other,
    }
}

/// Refuses the login with `f`: sends it, and logs it when `log_pooler_errors` is on.
async fn refuse(
    io: &mut ClientIo,
    cfg: &sluice_config::Config,
    peer: Option<SocketAddr>,
    user: &str,
    db: &str,
    f: ErrorFields,
) -> End {
    if cfg.sluice.log_pooler_errors {
        warn!(peer = %Peer(peer), user, db, code = f.code.as_str(), "login refused: {}", f.message);
    }
    io.send_error(&f).await;
    End::Refused(f.message)
}

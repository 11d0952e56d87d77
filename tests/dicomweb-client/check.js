#!/usr/bin/env node
/*
 * check.js - exercises yunying-cloud with an independent DICOMweb client (npm
 * dicomweb-client, XMLHttpRequest from xhr2) and prints one JSON object with
 * what it saw; tests/integration/test_dicomweb.py checks the figures.
 *
 *   node check.js BASE_URL TOKEN STUDY SERIES SOP STOW_FILE
 *
 * BASE_URL is .../dicomweb; TOKEN a session token (sent as a Bearer
 * token); STOW_FILE a DICOM file stored through storeInstances().
 */
'use strict';
const fs = require('fs');
global.XMLHttpRequest = require('xhr2');
const { api } = require('dicomweb-client');

async function main() {
  const [base, token, study, series, sop, stowFile] = process.argv.slice(2);
  const client = new api.DICOMwebClient({
    url: base,
    headers: { Authorization: `Bearer ${token}` },
  });
  const out = {};
  const studies = await client.searchForStudies({ queryParams: { StudyInstanceUID: study } });
  out.studies = studies.length;
  out.studyPatientName = studies[0]['00100010'].Value[0].Alphabetic;
  out.studyInstances = studies[0]['00201208'].Value[0];
  const series_ = await client.searchForSeries({ studyInstanceUID: study });
  out.series = series_.map((s) => s['0020000E'].Value[0]);
  const insts = await client.searchForInstances({
    studyInstanceUID: study,
    seriesInstanceUID: series,
    queryParams: { limit: '100' },
  });
  out.instances = insts.map((i) => i['00080018'].Value[0]);
  const meta = await client.retrieveSeriesMetadata({ studyInstanceUID: study, seriesInstanceUID: series });
  out.metadata = meta.length;
  out.metaRows = meta[0]['00280010'].Value[0];
  const inst = await client.retrieveInstance({
    studyInstanceUID: study, seriesInstanceUID: series, sopInstanceUID: sop,
  });
  out.instanceBytes = inst.byteLength;
  const dicm = Buffer.from(inst).subarray(128, 132).toString('latin1');
  out.instanceMagic = dicm;
  const frames = await client.retrieveInstanceFrames({
    studyInstanceUID: study, seriesInstanceUID: series, sopInstanceUID: sop, frameNumbers: [1],
  });
  out.frames = frames.length;
  out.frameBytes = frames[0].byteLength;
  out.frameSha = require('crypto').createHash('sha256').update(Buffer.from(frames[0])).digest('hex');
  const data = fs.readFileSync(stowFile);
  const ab = data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength);
  const res = await client.storeInstances({ datasets: [ab] });
  /* Without a responseType, XMLHttpRequest hands over the JSON answer as text. */
  const stow = typeof res === 'string' ? JSON.parse(res) : res;
  out.stowStored = stow['00081199'] ? stow['00081199'].Value.length : 0;
  out.stowFailed = stow['00081198'] ? stow['00081198'].Value.length : 0;
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((e) => {
  process.stderr.write(`dicomweb-client check failed: ${e && (e.stack || e.message || JSON.stringify(e))}\n`);
  process.exit(1);
});

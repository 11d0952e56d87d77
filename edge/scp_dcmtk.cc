/*
 * scp_dcmtk.cc - C-ECHO / C-STORE SCP on DCMTK's DcmSCPPool (see scp_dcmtk.h).
 *
 * Threads:
 *   listener  our own loop: poll()s the listening socket (bound to opts.bind,
 *             which DCMTK 3.6.7 cannot do itself) with a 250 ms timeout so
 *             edge_scp_stop() is noticed, accept()s, sets TCP_NODELAY and
 *             hands the connected socket to DCMTK through
 *             dcmExternalSocketHandle (read only by this thread), which
 *             reads the A-ASSOCIATE-RQ; then runAssociation() gives it to a
 *             pool worker, or it is rejected "local limit exceeded".
 *   workers   one DcmThreadSCP per association (EdgeStoreSCP), detached
 *             (DCMTK never joins them), deleted by the pool when done.
 *
 * Association state, per worker (DcmSCP drives it; we hook in):
 *
 *   RQ received --called AE != ours--> rejected (called AE not recognized)
 *        |      --calling AE not in opts.allowed_calling_aes-->
 *        |                               rejected (calling AE not recognized)
 *        |      --peer not in opts.allowed_peers--> rejected (no reason given)
 *        |      --stopping-----------> refused
 *        v
 *   negotiated --C-ECHO--> DcmSCP answers
 *        |     --C-STORE--> store_begin -> receive to file -> store_end -> response
 *        v
 *   released / aborted / DIMSE timeout -> worker thread exits
 *
 * Every entry point from DCMTK into our code catches all exceptions.
 * Only one SCP per process (the workers find it through g_scp, because the
 * pool constructs them with no arguments).
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <atomic>
#include <string>
#include <vector>

#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmdata/dcdeftag.h"
#include "dcmtk/dcmdata/dcdict.h"
#include "dcmtk/dcmdata/dcmetinf.h"
#include "dcmtk/dcmdata/dcostrmb.h"
#include "dcmtk/dcmdata/dcuid.h"
#include "dcmtk/dcmnet/assoc.h"
#include "dcmtk/dcmnet/dimse.h"
#include "dcmtk/dcmnet/dul.h"
#include "dcmtk/dcmnet/scppool.h"
#include "dcmtk/dcmnet/scpthrd.h"
#include "dcmtk/dcmdata/dcostrma.h"
#include "dcmtk/dcmdata/dcostrmf.h"
#include "dcmtk/oflog/oflog.h"

#include "cmn/crypto.h"   /* has its own extern "C" */
extern "C" {
#include "cmn/fs.h"
#include "cmn/log.h"
}
#include "proto/proto.h"
#include "scp_dcmtk.h"

/* ------------------------------------------------------------ SOP classes */

/* Storage SOP classes offered. DCMTK knows ~186, a profile holds at most
 * 128 presentation contexts (Verification takes one): the image modalities
 * of a hospital PACS plus the objects that travel with them. */
static const char *const k_storage_classes[] = {
    /* CT */
    UID_CTImageStorage, UID_EnhancedCTImageStorage, UID_LegacyConvertedEnhancedCTImageStorage,
    /* MR */
    UID_MRImageStorage, UID_EnhancedMRImageStorage, UID_EnhancedMRColorImageStorage,
    UID_LegacyConvertedEnhancedMRImageStorage, UID_MRSpectroscopyStorage,
    /* CR, DX / DR, intra-oral */
    UID_ComputedRadiographyImageStorage, UID_DigitalXRayImageStorageForPresentation,
    UID_DigitalXRayImageStorageForProcessing, UID_DigitalIntraOralXRayImageStorageForPresentation,
    UID_DigitalIntraOralXRayImageStorageForProcessing,
    /* MG, breast tomosynthesis / projection */
    UID_DigitalMammographyXRayImageStorageForPresentation,
    UID_DigitalMammographyXRayImageStorageForProcessing, UID_BreastTomosynthesisImageStorage,
    UID_BreastProjectionXRayImageStorageForPresentation,
    UID_BreastProjectionXRayImageStorageForProcessing,
    /* XA, RF */
    UID_XRayAngiographicImageStorage, UID_EnhancedXAImageStorage,
    UID_XRayRadiofluoroscopicImageStorage, UID_EnhancedXRFImageStorage,
    UID_XRay3DAngiographicImageStorage, UID_XRay3DCraniofacialImageStorage,
    /* US */
    UID_UltrasoundImageStorage, UID_UltrasoundMultiframeImageStorage, UID_EnhancedUSVolumeStorage,
    /* SC */
    UID_SecondaryCaptureImageStorage, UID_MultiframeSingleBitSecondaryCaptureImageStorage,
    UID_MultiframeGrayscaleByteSecondaryCaptureImageStorage,
    UID_MultiframeGrayscaleWordSecondaryCaptureImageStorage,
    UID_MultiframeTrueColorSecondaryCaptureImageStorage,
    /* NM, PET */
    UID_NuclearMedicineImageStorage, UID_PositronEmissionTomographyImageStorage,
    UID_EnhancedPETImageStorage, UID_LegacyConvertedEnhancedPETImageStorage,
    /* RT */
    UID_RTImageStorage, UID_RTDoseStorage, UID_RTStructureSetStorage, UID_RTPlanStorage,
    UID_RTBeamsTreatmentRecordStorage, UID_RTIonPlanStorage,
    /* endoscopy, photography, ophthalmology, pathology */
    UID_VLEndoscopicImageStorage, UID_VideoEndoscopicImageStorage, UID_VLMicroscopicImageStorage,
    UID_VLSlideCoordinatesMicroscopicImageStorage, UID_VLPhotographicImageStorage,
    UID_VideoPhotographicImageStorage, UID_OphthalmicPhotography8BitImageStorage,
    UID_OphthalmicPhotography16BitImageStorage, UID_OphthalmicTomographyImageStorage,
    UID_VLWholeSlideMicroscopyImageStorage, UID_DermoscopicPhotographyImageStorage,
    /* presentation states, key objects, SR, dose, segmentation, registration */
    UID_GrayscaleSoftcopyPresentationStateStorage, UID_ColorSoftcopyPresentationStateStorage,
    UID_PseudoColorSoftcopyPresentationStateStorage, UID_BlendingSoftcopyPresentationStateStorage,
    UID_XAXRFGrayscaleSoftcopyPresentationStateStorage, UID_KeyObjectSelectionDocumentStorage,
    UID_BasicTextSRStorage, UID_EnhancedSRStorage, UID_ComprehensiveSRStorage,
    UID_Comprehensive3DSRStorage, UID_MammographyCADSRStorage, UID_ChestCADSRStorage,
    UID_XRayRadiationDoseSRStorage, UID_EnhancedXRayRadiationDoseSRStorage,
    UID_RadiopharmaceuticalRadiationDoseSRStorage, UID_PatientRadiationDoseSRStorage,
    UID_SegmentationStorage, UID_SpatialRegistrationStorage, UID_SpatialFiducialsStorage,
    UID_DeformableSpatialRegistrationStorage, UID_RawDataStorage, UID_ParametricMapStorage,
    /* encapsulated documents, ECG */
    UID_EncapsulatedPDFStorage, UID_EncapsulatedCDAStorage, UID_TwelveLeadECGWaveformStorage,
    UID_GeneralECGWaveformStorage,
};

/* Transfer syntaxes, in order of preference: when one presentation context
 * proposes several, we take the first of ours. Lossless compressed first
 * (fewer bytes, still pixel-exact), then uncompressed, lossy last so that a
 * context offering lossy plus uncompressed never gets lossy. */
static const char *const k_transfer_syntaxes[] = {
    UID_JPEGLSLosslessTransferSyntax,
    UID_JPEG2000LosslessOnlyTransferSyntax,
    UID_JPEGProcess14SV1TransferSyntax,
    UID_JPEGProcess14TransferSyntax,
    UID_RLELosslessTransferSyntax,
    UID_LittleEndianExplicitTransferSyntax,
    UID_LittleEndianImplicitTransferSyntax,
    UID_DeflatedExplicitVRLittleEndianTransferSyntax,
    UID_JPEGLSLossyTransferSyntax,
    UID_JPEG2000TransferSyntax,
    UID_JPEGProcess1TransferSyntax,
    UID_JPEGProcess2_4TransferSyntax,
};

/* ------------------------------------------------------------ state */

struct edge_scp {
    edge_scp_opts_t opts;        /* strings below are our copies */
    std::string ae_title;
    std::string bind;
    std::vector<std::string> allowed_aes; /* empty = any calling AE */
    std::string allowed_peers;   /* CIDR list, "" = any peer */
    int port;                    /* bound port */
    int listen_fd;               /* owned */
    pthread_t listener;
    bool started;
    bool stopped;
    std::atomic<bool> stopping;
    class EdgePool *pool;        /* owned; leaked if workers outlive stop */
};

static edge_scp *g_scp;          /* the one SCP of this process */

static std::string trim(const OFString &s)
{
    std::string r(s.c_str());
    while (!r.empty() && r.back() == ' ')
        r.pop_back();
    size_t i = 0;
    while (i < r.size() && r[i] == ' ')
        i++;
    return r.substr(i);
}

/* ------------------------------------------------------------ receive */

/* Where DIMSE_receiveDataSetInFile puts the data set bytes: checksummed on
 * the way (XXH3-128, so the spool need not read the file back; SHA-256 here
 * took 30% of the edge's ingest CPU), into the stream (the spool's journal
 * lane) and into the temporary file - unless the stream keeps the bytes in
 * memory, and then only from the moment it stops (spilling what it kept).
 * A write error is remembered and the rest of the data set is consumed and
 * dropped, so the association stays in step and the C side answers A700. */
class HashFileConsumer : public DcmConsumer
{
public:
    HashFileConsumer(int fd, const char *path, cmn_xxh128_ctx_t *sum, int err, void *stream,
                     bool keep)
        : m_fd(fd), m_path(path), m_sum(sum), m_err(err), m_stream(stream), m_keep(keep) {}
    virtual OFBool good() const { return OFTrue; }
    virtual OFCondition status() const { return EC_Normal; }
    virtual OFBool isFlushed() const { return OFTrue; }
    virtual offile_off_t avail() const { return (offile_off_t)1 << 30; }
    virtual void flush() {}
    virtual offile_off_t write(const void *buf, offile_off_t len)
    {
        if (m_err == 0 && len > 0) {
            cmn_xxh128_update(m_sum, buf, (size_t)len);
            if (m_keep) {
                if (g_scp->opts.stream_data(m_stream, buf, (size_t)len))
                    return len;
                spill();
                if (m_err != 0)
                    return len;
                writeAll(buf, (size_t)len);
                return len;
            }
            writeAll(buf, (size_t)len);
            if (m_err == 0 && m_stream)
                g_scp->opts.stream_data(m_stream, buf, (size_t)len);
        }
        return len;
    }
    int error() const { return m_err; }
    bool kept() const { return m_keep && m_err == 0; }
    int fd() const { return m_fd; }

private:
    void writeAll(const void *buf, size_t len)
    {
        int rc = cmn_write_all(m_fd, buf, len);
        if (rc < 0)
            m_err = -rc;
    }
    /* The stream stopped keeping (too big, or its budget spent): the
     * temporary file after all, starting with what it kept. */
    void spill()
    {
        m_keep = false;
        m_fd = open(m_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
        if (m_fd < 0) {
            m_err = errno;
            return;
        }
        int rc = g_scp->opts.stream_spill(m_stream, m_fd);
        if (rc < 0)
            m_err = -rc;
    }

    int m_fd;                    /* the temporary file, or -1 while the stream keeps */
    const char *m_path;
    cmn_xxh128_ctx_t *m_sum;
    int m_err;                   /* first write errno, 0 = none */
    void *m_stream;              /* opts.stream_data's handle, or NULL */
    bool m_keep;                 /* the stream keeps the bytes: no file */
};

class HashFileStream : public DcmOutputStream
{
public:
    explicit HashFileStream(HashFileConsumer *c) : DcmOutputStream(c) {}
};

/* ------------------------------------------------------------ worker */

class EdgeStoreSCP : public DcmThreadSCP
{
public:
    EdgeStoreSCP() : m_received(0), m_assoc(NULL), m_stream(NULL), m_stream_tried(false) {}

    virtual OFCondition run(T_ASC_Association *assoc)
    {
        OFCondition cond;

        /* DcmSCPPool never joins its threads: without this each association
         * leaks a stack mapping (c-stack.md). */
        pthread_detach(pthread_self());
        m_assoc = assoc;         /* DcmSCP keeps its copy private */
        try {
            cond = DcmThreadSCP::run(assoc);
        } catch (...) {
            fprintf(stderr, "yunying-edge: scp: exception in association, dropped\n");
            cond = EC_IllegalCall;
        }
        if (m_stream)
            g_scp->opts.stream_close(m_stream);
        m_stream = NULL;
        return cond;
    }

protected:
    virtual OFBool checkCalledAETitleAccepted(const OFString &calledAE)
    {
        edge_scp *s = g_scp;
        return s && trim(calledAE) == s->ae_title;
    }

    virtual OFBool checkCallingAETitleAccepted(const OFString &callingAE)
    {
        edge_scp *s = g_scp;
        if (!s)
            return OFFalse;
        if (s->allowed_aes.empty())
            return OFTrue;
        std::string ae = trim(callingAE);
        for (const std::string &a : s->allowed_aes) {
            if (a == ae)
                return OFTrue;
        }
        CMN_LOG_W("scp", "association rejected reason=calling_ae_not_allowed calling_ae=%s"
                  " peer=%s", ae.c_str(), getPeerIP().c_str());
        return OFFalse;
    }

    /* DCMTK 3.6.7 passes the *called* presentation address here, so the
     * argument is ignored: the peer is the calling address, which the
     * listener fills in from accept() (getPeerIP reads it). */
    virtual OFBool checkCallingHostAccepted(const OFString &hostOrIP)
    {
        edge_scp *s = g_scp;
        (void)hostOrIP;
        if (!s)
            return OFFalse;
        OFString peer = getPeerIP();
        if (proto_cidr_list_allows(s->allowed_peers.c_str(), peer.c_str()))
            return OFTrue;
        CMN_LOG_W("scp", "association rejected reason=peer_not_allowed peer=%s",
                  peer.empty() ? "-" : peer.c_str());
        return OFFalse;
    }

    virtual void notifyAssociationRequest(const T_ASC_Parameters &params,
                                          DcmSCPActionType &desiredAction)
    {
        (void)params;
        if (g_scp && g_scp->stopping.load())
            desiredAction = DCMSCP_ACTION_REFUSE_ASSOCIATION;
    }

    virtual void notifyRECEIVEProgress(const unsigned long byteCount)
    {
        m_received = byteCount;
    }

    virtual OFCondition handleIncomingCommand(T_DIMSE_Message *msg,
                                              const DcmPresentationContextInfo &presInfo)
    {
        try {
            if (msg->CommandField == DIMSE_C_STORE_RQ)
                return handleStore(msg->msg.CStoreRQ, presInfo);
            return DcmThreadSCP::handleIncomingCommand(msg, presInfo);
        } catch (...) {
            fprintf(stderr, "yunying-edge: scp: exception while handling a command\n");
            return EC_IllegalCall;
        }
    }

private:
    OFCondition handleStore(T_DIMSE_C_StoreRQ &req, const DcmPresentationContextInfo &presInfo)
    {
        edge_scp *s = g_scp;
        const T_ASC_PresentationContextID presID = presInfo.presentationContextID;
        char path[4096];
        OFCondition cond;
        edge_scp_store_t st;
        unsigned status;

        path[0] = '\0';
        int rc = s->opts.store_begin(s->opts.ud, path, sizeof(path));
        if (rc != 0) {
            /* Refused before receiving (no space): read and drop the data set
             * so the association stays in step, then answer A700. */
            cond = receiveSTORERequest(req, presID, OFString("/dev/null"));
            if (cond.bad())
                return cond;
            return sendSTOREResponse(presID, req, EDGE_STATUS_OUT_OF_RESOURCES);
        }

        if (!m_stream_tried && s->opts.stream_open) {
            m_stream = s->opts.stream_open(s->opts.ud);
            m_stream_tried = true;
        }
        bool keep = m_stream && s->opts.stream_begin(m_stream) == 1;
        m_received = 0;
        char sum[CMN_XXH128_HEX_LEN + 1];
        uint64_t file_bytes = 0;
        int write_err = 0;
        cond = receiveToFile(req, presID, path, sum, &file_bytes, &write_err, &keep);

        OFString calling = getPeerAETitle();
        OFString peer = getPeerIP();
        memset(&st, 0, sizeof(st));
        st.tmp_path = path;
        st.dataset_bytes = m_received;
        st.sop_class_uid = req.AffectedSOPClassUID;
        st.sop_instance_uid = req.AffectedSOPInstanceUID;
        st.calling_ae = calling.c_str();
        st.peer_ip = peer.c_str();
        st.stream = m_stream;
        if (cond.bad()) {
            st.receive_failed = 1;
            /* DIMSE read the rest of the data set and gave up on the file:
             * the association is still usable. */
            if (cond.module() == OFM_dcmnet && cond.code() == DIMSEC_OUTOFRESOURCES)
                st.out_of_resources = 1;
        } else if (write_err != 0) {
            st.receive_failed = 1;
            st.out_of_resources = 1;
        } else {
            st.xxh128 = sum;
            st.file_bytes = file_bytes;
            st.kept = keep;
        }
        status = s->opts.store_end(s->opts.ud, &st);
        if (cond.bad() && !st.out_of_resources)
            return cond;   /* network failure: DcmSCP ends the association */
        return sendSTOREResponse(presID, req, (Uint16)status);
    }

    /* The Part 10 meta header DIMSE_createFilestream would write for this
     * request: preamble, "DICM", group 0002 (explicit VR little endian). */
    OFCondition metaHeader(T_DIMSE_C_StoreRQ &req, T_ASC_PresentationContextID presID,
                           std::string &out)
    {
        T_ASC_PresentationContext pc;
        OFCondition cond = ASC_findAcceptedPresentationContext(m_assoc->params, presID, &pc);
        if (cond.bad())
            return cond;
        DcmMetaInfo meta;
        const Uint8 version[2] = {0, 1};
        const char *aet = m_assoc->params->DULparams.callingAPTitle;
        if ((cond = meta.putAndInsertUint32(DCM_FileMetaInformationGroupLength, 0)).bad() ||
            (cond = meta.putAndInsertUint8Array(DCM_FileMetaInformationVersion, version, 2))
                .bad() ||
            (cond = meta.putAndInsertString(DCM_MediaStorageSOPClassUID,
                                            req.AffectedSOPClassUID)).bad() ||
            (cond = meta.putAndInsertString(DCM_MediaStorageSOPInstanceUID,
                                            req.AffectedSOPInstanceUID)).bad() ||
            (cond = meta.putAndInsertString(DCM_TransferSyntaxUID, pc.acceptedTransferSyntax))
                .bad() ||
            (cond = meta.putAndInsertString(DCM_ImplementationClassUID,
                                            OFFIS_IMPLEMENTATION_CLASS_UID)).bad() ||
            (cond = meta.putAndInsertString(DCM_ImplementationVersionName,
                                            OFFIS_DTK_IMPLEMENTATION_VERSION_NAME2)).bad() ||
            (cond = meta.putAndInsertString(DCM_SourceApplicationEntityTitle, aet ? aet : ""))
                .bad())
            return cond;
        cond = meta.computeGroupLengthAndPadding(EGL_withGL, EPD_noChange,
                                                 META_HEADER_DEFAULT_TRANSFERSYNTAX,
                                                 EET_UndefinedLength);
        if (cond.bad())
            return cond;
        char buf[8192];
        DcmOutputBufferStream os(buf, sizeof(buf));
        meta.transferInit();
        cond = meta.write(os, META_HEADER_DEFAULT_TRANSFERSYNTAX, EET_ExplicitLength, NULL);
        meta.transferEnd();
        if (cond.bad())
            return cond;           /* a meta header over 8 KiB: UIDs are at most 64 bytes */
        void *p = NULL;
        offile_off_t n = 0;
        os.flush();
        os.flushBuffer(p, n);
        out.assign((const char *)p, (size_t)n);
        return EC_Normal;
    }

    /* What DcmSCP::receiveSTORERequest(filename) does, with our stream:
     * the meta header DCMTK would write, then the data set exactly as
     * received, checksummed on the way - into the temporary file, or only
     * into the stream while it keeps the bytes (*keep; cleared when it
     * stops and the file is written after all). On a write error the data
     * set is still read to its end (*write_err set, cond good). */
    OFCondition receiveToFile(T_DIMSE_C_StoreRQ &req, T_ASC_PresentationContextID presID,
                              const char *path, char sum_hex[CMN_XXH128_HEX_LEN + 1],
                              uint64_t *file_bytes, int *write_err, bool *keep)
    {
        T_ASC_PresentationContextID ds_pres = 0;
        cmn_xxh128_ctx_t sum;
        std::string meta;
        OFCondition cond;
        int fd = -1;

        *write_err = 0;
        cond = metaHeader(req, presID, meta);
        if (cond.good() && !*keep)
            fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
        if (cond.bad() || (!*keep && fd < 0)) {
            DIC_UL bytes = 0, pdvs = 0;
            cond = DIMSE_ignoreDataSet(m_assoc, getConfig().getDIMSEBlockingMode(),
                                       (int)getConfig().getDIMSETimeout(), &bytes, &pdvs);
            if (cond.good())
                cond = DIMSE_OUTOFRESOURCES;
            *keep = false;
            return cond;
        }
        cmn_xxh128_init(&sum);
        HashFileConsumer cons(fd, path, &sum, 0, m_stream, *keep);
        cons.write(meta.data(), (offile_off_t)meta.size());
        HashFileStream out(&cons);
        cond = DIMSE_receiveDataSetInFile(m_assoc, getConfig().getDIMSEBlockingMode(),
                                          (int)getConfig().getDIMSETimeout(), &ds_pres, &out,
                                          callbackRECEIVEProgress, this);
        if (cond.good() && ds_pres != presID)
            cond = DIMSE_RECEIVEFAILED;    /* data set on another context than its command */
        *write_err = cons.error();
        *keep = cons.kept();
        if (cons.fd() >= 0 && close(cons.fd()) < 0 && *write_err == 0)
            *write_err = errno;
        cmn_xxh128_final_hex(&sum, sum_hex);
        *file_bytes = (uint64_t)meta.size() + (uint64_t)out.tell();
        return cond;
    }

    unsigned long m_received;    /* data set bytes received so far (progress callback) */
    T_ASC_Association *m_assoc;  /* this worker's association (owned by DcmSCP) */
    void *m_stream;              /* opts.stream_open's handle for this association, or NULL */
    bool m_stream_tried;         /* stream_open was called */
};

/* ------------------------------------------------------------ pool */

class EdgePool : public DcmSCPPool<EdgeStoreSCP>
{
public:
    explicit EdgePool(edge_scp *s) : m_scp(s) {}

    /* Our own listen loop (see the file header): the stock one binds to
     * INADDR_ANY and cannot report readiness or stop promptly. */
    virtual OFCondition listen()
    {
        DcmSharedSCPConfig shared(getConfig());
        T_ASC_Network *net = NULL;
        OFCondition cond;

        /* With an external socket set, DCMTK creates no listening socket. */
        dcmExternalSocketHandle.set(m_scp->listen_fd);
        cond = ASC_initializeNetwork(NET_ACCEPTOR, m_scp->port, m_scp->opts.acse_timeout_s, &net);
        dcmExternalSocketHandle.set(DCMNET_INVALID_SOCKET);
        if (cond.bad())
            return cond;

        while (!m_scp->stopping.load()) {
            struct pollfd pfd = {m_scp->listen_fd, POLLIN, 0};
            int n = poll(&pfd, 1, 250);
            if (n <= 0)
                continue;
            struct sockaddr_storage peer_sa;
            socklen_t peer_len = sizeof(peer_sa);
            char peer_ip[INET6_ADDRSTRLEN] = "";
            int fd = accept4(m_scp->listen_fd, (struct sockaddr *)&peer_sa, &peer_len,
                             SOCK_CLOEXEC);
            if (fd < 0) {
                if (errno == EMFILE || errno == ENFILE || errno == ENOMEM)
                    usleep(100 * 1000);
                continue;
            }
            if (fd == 0) {
                /* DCMTK treats an external socket 0 as "none". */
                int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
                close(fd);
                if (nfd < 0)
                    continue;
                fd = nfd;
            }
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            if (peer_sa.ss_family == AF_INET)
                inet_ntop(AF_INET, &((struct sockaddr_in *)&peer_sa)->sin_addr, peer_ip,
                          sizeof(peer_ip));
            else if (peer_sa.ss_family == AF_INET6)
                inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&peer_sa)->sin6_addr, peer_ip,
                          sizeof(peer_ip));

            T_ASC_Association *assoc = NULL;
            dcmExternalSocketHandle.set(fd);
            cond = ASC_receiveAssociation(net, &assoc, getConfig().getMaxReceivePDULength(), NULL,
                                          NULL, OFFalse, DUL_BLOCK, 0);
            dcmExternalSocketHandle.set(DCMNET_INVALID_SOCKET);
            if (cond.good() && assoc && assoc->params && peer_ip[0]) {
                /* DCMTK leaves the peer address empty for an external socket:
                 * fill it in, for scp.allowed_peers (checkCallingHostAccepted)
                 * and for the logs (getPeerIP). */
                char *pa = assoc->params->DULparams.callingPresentationAddress;
                size_t pasz = sizeof(assoc->params->DULparams.callingPresentationAddress);
                snprintf(pa, pasz, "%s", peer_ip);
            }
            if (cond.good()) {
                cond = runAssociation(assoc, shared);
                if (cond.bad()) {
                    rejectAssociation(assoc, cond == NET_EC_SCPBusy
                                                 ? ASC_REASON_SP_PRES_LOCALLIMITEXCEEDED
                                                 : ASC_REASON_SP_PRES_TEMPORARYCONGESTION);
                    dropAndDestroyAssociation(assoc);
                }
            } else if (assoc) {
                dropAndDestroyAssociation(assoc);
            } else {
                close(fd);
            }
        }
        ASC_dropNetwork(&net);
        return EC_Normal;
    }

private:
    edge_scp *m_scp;
};

static void *listener_main(void *arg)
{
    edge_scp *s = (edge_scp *)arg;
    try {
        OFCondition cond = s->pool->listen();
        if (cond.bad())
            fprintf(stderr, "yunying-edge: scp: listener failed: %s\n", cond.text());
    } catch (...) {
        fprintf(stderr, "yunying-edge: scp: exception in listener\n");
    }
    return NULL;
}

/* ------------------------------------------------------------ C API */

extern "C" int edge_scp_num_sop_classes(void)
{
    return (int)(sizeof(k_storage_classes) / sizeof(k_storage_classes[0]));
}

static int bind_socket(edge_scp *s, char *err, size_t errlen)
{
    struct sockaddr_in sa;
    socklen_t salen = sizeof(sa);
    int one = 1;

    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)s->opts.port);
    if (inet_pton(AF_INET, s->bind.c_str(), &sa.sin_addr) != 1) {
        snprintf(err, errlen, "scp.bind: '%s' is not an IPv4 address", s->bind.c_str());
        return -EINVAL;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        int e = errno;
        snprintf(err, errlen, "socket: %s", strerror(e));
        return -e;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 64) < 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &salen) < 0) {
        int e = errno;
        snprintf(err, errlen, "cannot listen on %s:%d: %s", s->bind.c_str(), s->opts.port,
                 strerror(e));
        close(fd);
        return -e;
    }
    s->listen_fd = fd;
    s->port = ntohs(sa.sin_port);
    return 0;
}

extern "C" int edge_scp_create(const edge_scp_opts_t *opts, edge_scp_t **out, char *err,
                               size_t errlen)
{
    *out = NULL;
    if (g_scp) {
        snprintf(err, errlen, "only one SCP per process");
        return -EBUSY;
    }
    edge_scp *s = NULL;
    try {
        if (!dcmDataDict.isDictionaryLoaded()) {
            snprintf(err, errlen, "DCMTK data dictionary not loaded (DCMDICTPATH?)");
            return -ENOENT;
        }
        s = new edge_scp();
        s->opts = *opts;
        s->ae_title = opts->ae_title;
        s->bind = opts->bind ? opts->bind : "0.0.0.0";
        s->allowed_peers = opts->allowed_peers ? opts->allowed_peers : "";
        for (const char *p = opts->allowed_calling_aes ? opts->allowed_calling_aes : ""; *p;) {
            size_t n = strcspn(p, ",");
            std::string ae = trim(OFString(p, n));
            if (!ae.empty())
                s->allowed_aes.push_back(ae);
            p += n + (p[n] == ',');
        }
        s->opts.ae_title = NULL;
        s->opts.bind = NULL;
        s->opts.allowed_calling_aes = NULL;
        s->opts.allowed_peers = NULL;
        s->listen_fd = -1;
        s->started = s->stopped = false;
        s->stopping.store(false);
        s->pool = NULL;

        int rc = bind_socket(s, err, errlen);
        if (rc < 0) {
            delete s;
            return rc;
        }

        s->pool = new EdgePool(s);
        DcmSCPConfig &cfg = s->pool->getConfig();
        cfg.setAETitle(s->ae_title.c_str());
        cfg.setPort((Uint16)s->port);
        cfg.setRespondWithCalledAETitle(OFTrue);
        cfg.setHostLookupEnabled(OFFalse);
        cfg.setProgressNotificationMode(OFTrue);
        cfg.setMaxReceivePDULength(ASC_MAXIMUMPDUSIZE);
        cfg.setACSETimeout((Uint32)opts->acse_timeout_s);
        cfg.setDIMSEBlockingMode(DIMSE_NONBLOCKING);
        cfg.setDIMSETimeout((Uint32)opts->dimse_timeout_s);
        cfg.setConnectionBlockingMode(DUL_NOBLOCK);
        cfg.setConnectionTimeout(1);
        s->pool->setMaxThreads((Uint16)opts->max_associations);

        OFList<OFString> ts;
        for (const char *t : k_transfer_syntaxes)
            ts.push_back(t);
        OFList<OFString> ts_echo;
        ts_echo.push_back(UID_LittleEndianExplicitTransferSyntax);
        ts_echo.push_back(UID_LittleEndianImplicitTransferSyntax);
        OFCondition cond = cfg.addPresentationContext(UID_VerificationSOPClass, ts_echo);
        for (const char *c : k_storage_classes) {
            if (cond.bad())
                break;
            cond = cfg.addPresentationContext(c, ts);
        }
        if (cond.bad()) {
            snprintf(err, errlen, "presentation contexts: %s", cond.text());
            close(s->listen_fd);
            delete s->pool;
            delete s;
            return -EINVAL;
        }
    } catch (...) {
        snprintf(err, errlen, "exception while configuring the SCP");
        if (s) {
            if (s->listen_fd >= 0)
                close(s->listen_fd);
            delete s->pool;
            delete s;
        }
        return -ENOMEM;
    }
    g_scp = s;
    *out = s;
    return 0;
}

extern "C" int edge_scp_port(const edge_scp_t *scp)
{
    return scp->port;
}

extern "C" int edge_scp_start(edge_scp_t *scp)
{
    int rc = pthread_create(&scp->listener, NULL, listener_main, scp);
    if (rc != 0)
        return -rc;
    scp->started = true;
    return 0;
}

extern "C" int edge_scp_stop(edge_scp_t *scp, int wait_ms)
{
    size_t busy = 0;

    if (!scp || scp->stopped)
        return 0;
    scp->stopping.store(true);
    if (scp->started)
        pthread_join(scp->listener, NULL);
    scp->stopped = true;
    try {
        for (int waited = 0;; waited += 20) {
            busy = scp->pool->numThreads(OFTrue);
            if (busy == 0 || waited >= wait_ms)
                break;
            usleep(20 * 1000);
        }
    } catch (...) {
        busy = 1;
    }
    if (busy > 0)
        scp->pool = NULL;    /* workers still hold it: leak it, the process is exiting */
    return (int)busy;
}

extern "C" void edge_scp_destroy(edge_scp_t *scp)
{
    if (!scp)
        return;
    if (scp->listen_fd >= 0)
        close(scp->listen_fd);
    try {
        delete scp->pool;
    } catch (...) {
    }
    if (g_scp == scp)
        g_scp = NULL;
    delete scp;
}
